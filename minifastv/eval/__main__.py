"""python -m minifastv.eval tasks: the directory to pass to lmms-eval as --include_path.
python -m minifastv.eval sweep ...: methods x budgets x tasks through lmms-eval (see sweep.py, --help)."""

import sys

from . import TASKS


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tasks"] and len(argv) == 1:
        print(TASKS)
        return 0
    if argv[:1] == ["sweep"]:
        from .sweep import main as sweep

        return sweep(argv[1:])
    print(__doc__, file=sys.stderr)
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
