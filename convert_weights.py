"""Convert a LLaVA-1.5 checkpoint (original liuhaotian, llava-hf, or transformers 5.x names) to minifastv.

    python convert_weights.py SRC OUT [--vision-tower CLIP_DIR] [--dtype float16] [--tokenizer tokenizer.json]

The same as `python -m minifastv convert`.
"""

import sys

from minifastv.cli import main as cli_main


def main(argv=None) -> int:
    return cli_main(["convert", *(sys.argv[1:] if argv is None else argv)], convert_prog="python convert_weights.py")


if __name__ == "__main__":
    sys.exit(main())
