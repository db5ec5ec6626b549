"""minifastv's LLaVA-NeXT inside lmms-eval: the tiny LLaVA-NeXT on the offline anyres task (pictures of their own
sizes, so each request has its own image size and token count) through the real CLI reproduces
`evaluate_tiny.py --anyres` exactly, unpruned and pruned, in batches of mixed sizes and across processes."""

from __future__ import annotations

import json

import pytest

from anyres_shapes import QUESTION_TYPES, evaluate, example, write_task_data
from minifastv.eval import TASKS
from minifastv.pruning import at_budget

TASK = "minifastv_shapes_anyres"
DATA = TASKS / "minifastv_shapes" / "heldout_anyres.jsonl"
N = 400


@pytest.fixture(scope="module")
def next_pipe():
    from minifastv.data import TINY_NEXT_MODEL
    from minifastv.pipeline import Pipeline

    return Pipeline.load(TINY_NEXT_MODEL, dtype="float32")


def test_task_data_is_the_held_out_split(tmp_path):
    write_task_data(tmp_path / "heldout.jsonl")
    assert (tmp_path / "heldout.jsonl").read_bytes() == DATA.read_bytes()
    docs = [json.loads(line) for line in DATA.read_text().splitlines()[:8]]
    assert [d["question"] for d in docs] == [example("heldout", i).question for i in range(8)]


CASES = [("none", "", None), ("fastv-25%", "prune=fastv,prune_ratio=0.75,prune_k=2", ("fastv", 0.25, 2)),
         ("views-apart", "prune=fastv,prune_ratio=0.75,prune_k=2,anyres=views-apart", ("fastv", 0.25, 2))]


def run_name(name):
    from minifastv.data import TINY_NEXT_MODEL

    args = next(a for n, a, _ in CASES if n == name)
    return f"next-{name}", f"pretrained={TINY_NEXT_MODEL}" + (f",{args}" if args else "")


@pytest.mark.parametrize("name,args,method", CASES, ids=[c[0] for c in CASES])
def test_anyres_task_reproduces_evaluate_tiny(runs, next_pipe, name, args, method):
    from minifastv.pruning import AnyresParts
    from minifastv.pruning.anyres_parts import TREATMENTS

    run = runs(*run_name(name), tasks=TASK)
    prune = None if method is None else at_budget(*method)
    if "anyres=" in args:
        prune = AnyresParts(prune, **TREATMENTS[args.split("anyres=")[1]])
    reference = evaluate(next_pipe, N, prune=prune)
    assert run.score(TASK) == reference["all"]
    for kind in QUESTION_TYPES:
        assert run.score(TASK, kind) == reference[kind]
    stats = run.stats["tasks"][TASK]
    assert stats["requests"] == N and stats["failed"] == 0
    assert stats["relative_prefill_flops"] == pytest.approx(reference["flops"], abs=1e-12)


def test_two_processes_and_batch_size_1_answer_as_one(runs):
    one = runs(*run_name("fastv-25%"), tasks=TASK)
    two = runs("next-fastv-2p", run_name("fastv-25%")[1], tasks=TASK, processes=2, batch_size=8, limit=99)
    single = runs("next-fastv-b1", run_name("fastv-25%")[1], tasks=TASK, batch_size=1, limit=40)
    assert "Running on rank 1" in two.log
    assert two.answers() == {d: a for d, a in one.answers().items() if d < 99}
    assert single.answers() == {d: a for d, a in one.answers().items() if d < 40}


@pytest.mark.parametrize("bad,message", [({"prune": "fastv", "prune_kept": 64}, "no one budget; give prune_ratio"),
                                         ({"prune": "fastv", "anyres": "rows"}, "anyres=rows: not one of"),
                                         ({"anyres": "views-apart"}, "need prune=METHOD")])
def test_bad_model_args_are_named(bad, message):
    from minifastv.data import TINY_NEXT_MODEL
    from minifastv.eval.lmms import MiniFastV

    with pytest.raises(ValueError, match=message):
        MiniFastV(pretrained=str(TINY_NEXT_MODEL), dtype="float32", **bad)


def test_anyres_needs_a_model_with_tiles():
    from minifastv.eval.lmms import MiniFastV

    with pytest.raises(ValueError, match="this model has no tiles"):
        MiniFastV(dtype="float32", prune="fastv", anyres="views-apart")
