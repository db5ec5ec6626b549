"""Convert a LLaVA-1.5, LLaVA-NeXT, Video-LLaVA or Qwen-VL-Chat checkpoint to minifastv (docs/converting.md).

    python convert_weights.py SRC OUT [--vision-tower CLIP_DIR] [--dtype float16] [--tokenizer tokenizer.json]

The same as `python -m minifastv convert`.
"""

import sys

from minifastv.cli import main as cli_main


def main(argv=None) -> int:
    return cli_main(["convert", *(sys.argv[1:] if argv is None else argv)], convert_prog="python convert_weights.py")


if __name__ == "__main__":
    sys.exit(main())
