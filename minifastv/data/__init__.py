"""Files that ship inside the package: the trained tiny model and the demo's held-out images."""

from pathlib import Path

TINY_MODEL = Path(__file__).parent / "tiny"    # config.json, model.safetensors, tokenizer.json (train_tiny.py)
SAMPLES = Path(__file__).parent / "samples"    # heldout_*.png and questions.json (shapes.write_samples)
