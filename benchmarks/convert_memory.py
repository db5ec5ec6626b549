"""Peak memory of convert_weights.py on a generated multi-GB llava-hf checkpoint.

    python benchmarks/convert_memory.py [--layers 8] [--workdir /tmp/convert-bench]

Writes a llava-hf-layout checkpoint with LLaVA-1.5-7B shapes (fp16, random, `--layers` decoder layers,
2 GiB shards), converts it in a child process and prints the child's peak resident memory next to the
checkpoint and shard sizes. Streaming conversion should peak near one input shard plus one output shard,
far below the whole model.
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minifastv.checkpoint import ShardWriter  # noqa: E402


def write_source(d: Path, n_layers: int):
    d.mkdir(parents=True)
    D, M, V, C, CM = 4096, 11008, 32064, 1024, 4096
    shapes = {"language_model.model.embed_tokens.weight": (V, D), "language_model.lm_head.weight": (V, D),
              "language_model.model.norm.weight": (D,), "multi_modal_projector.linear_1.weight": (D, C),
              "multi_modal_projector.linear_1.bias": (D,), "multi_modal_projector.linear_2.weight": (D, D),
              "multi_modal_projector.linear_2.bias": (D,)}
    for i in range(n_layers):
        p = f"language_model.model.layers.{i}."
        shapes.update({p + f"self_attn.{x}_proj.weight": (D, D) for x in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (M, D), p + "mlp.up_proj.weight": (M, D),
                       p + "mlp.down_proj.weight": (D, M), p + "input_layernorm.weight": (D,),
                       p + "post_attention_layernorm.weight": (D,)})
    v = "vision_tower.vision_model."
    shapes.update({v + "embeddings.class_embedding": (C,), v + "embeddings.patch_embedding.weight": (C, 3, 14, 14),
                   v + "embeddings.position_embedding.weight": (577, C), v + "pre_layrnorm.weight": (C,),
                   v + "pre_layrnorm.bias": (C,), v + "post_layernorm.weight": (C,), v + "post_layernorm.bias": (C,)})
    for i in range(24):
        p = f"{v}encoder.layers.{i}."
        for x in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({p + f"self_attn.{x}.weight": (C, C), p + f"self_attn.{x}.bias": (C,)})
        shapes.update({p + "mlp.fc1.weight": (CM, C), p + "mlp.fc1.bias": (CM,), p + "mlp.fc2.weight": (C, CM),
                       p + "mlp.fc2.bias": (C,), p + "layer_norm1.weight": (C,), p + "layer_norm1.bias": (C,),
                       p + "layer_norm2.weight": (C,), p + "layer_norm2.bias": (C,)})
    writer = ShardWriter(d, 2 << 30)
    for name, shape in shapes.items():
        writer.add(name, torch.randn(shape, dtype=torch.float16))
    writer.close()
    config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "torch_dtype": "float16",
              "image_token_index": 32000, "text_config": {"model_type": "llama", "vocab_size": V,
                                                          "num_hidden_layers": n_layers, "rms_norm_eps": 1e-5,
                                                          "max_position_embeddings": 4096}}
    (d / "config.json").write_text(json.dumps(config))
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>")).save(str(d / "tokenizer.json"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--workdir", default="/tmp/convert-bench")
    args = p.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    write_source(work / "src", args.layers)
    files = sorted((work / "src").glob("*.safetensors"))
    total, largest = sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)
    print(f"source: {len(files)} shards, {total / 2**30:.2f} GiB, largest {largest / 2**30:.2f} GiB "
          f"(written in {time.perf_counter() - start:.0f}s)")
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), str(work / "src"), str(work / "out")], check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"convert: {time.perf_counter() - start:.0f}s, peak RSS {peak / 2**30:.2f} GiB "
          f"= {peak / total:.2f}x the checkpoint, {peak / largest:.2f}x the largest shard")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
