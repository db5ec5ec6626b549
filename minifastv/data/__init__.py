"""Files that ship inside the package: the trained tiny models and the demo's held-out images and videos."""

from pathlib import Path

TINY_MODEL = Path(__file__).parent / "tiny"    # config.json, model.safetensors, tokenizer.json (train_tiny.py)
TINY_VIDEO_MODEL = Path(__file__).parent / "tiny_video"  # the same, of the tiny Video-LLaVA (train_tiny.py --video)
TINY_NEXT_MODEL = Path(__file__).parent / "tiny_next"    # and of the tiny LLaVA-NeXT (train_tiny.py --anyres)
TINY_QWEN_MODEL = Path(__file__).parent / "tiny_qwen"    # and of the tiny Qwen-VL (train_tiny.py --qwen)
SAMPLES = Path(__file__).parent / "samples"    # heldout_*.png and questions.json (shapes.write_samples),
#   heldout_video_*.mkv and video_questions.json (video_shapes.write_samples)
