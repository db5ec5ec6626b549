"""Convert a LLaVA-1.5 checkpoint (original liuhaotian, llava-hf, or transformers 5.x names) to minifastv.

    python convert_weights.py SRC OUT [--vision-tower CLIP_DIR] [--dtype float16] [--tokenizer tokenizer.json]
"""

import argparse
import sys

from minifastv.convert import convert


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="source checkpoint directory (config.json + weights)")
    p.add_argument("out", help="output directory (must not exist unless --force)")
    p.add_argument("--vision-tower", help="CLIP checkpoint directory, for original LLaVA checkpoints without one")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="output dtype (default: the source config's dtype, else float32)")
    p.add_argument("--tokenizer", help="tokenizer.json to ship (default: SRC/tokenizer.json)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="output shard size")
    args = p.parse_args(argv)
    try:
        convert(args.src, args.out, vision_tower=args.vision_tower, dtype=args.dtype, tokenizer=args.tokenizer,
                force=args.force, max_shard_bytes=int(args.max_shard_gb * 2**30))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
