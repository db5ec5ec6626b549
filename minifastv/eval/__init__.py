"""minifastv in lmms-eval (the optional extra `[eval]`): the model that lmms-eval loads as `--model minifastv`
(lmms.py), an offline task made of the tiny model's held-out questions (tasks/), and a sweep over methods and
budgets that writes one table and an accuracy-against-FLOPs plot (sweep.py).

Nothing here is imported by the rest of minifastv; lmms-eval finds the model through the entry point
`lmms_eval.models` (pyproject.toml) and the tasks through `--include_path` (TASKS).
"""

from pathlib import Path

TASKS = Path(__file__).parent / "tasks"  # pass to lmms-eval as --include_path


def manifest():
    """lmms-eval's registration of the model (its `lmms_eval.models` entry point calls this)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="minifastv", simple_class_path="minifastv.eval.lmms.MiniFastV")
