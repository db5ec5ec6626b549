"""minifastv's Qwen-VL inside lmms-eval: the tiny Qwen-VL on the offline shapes task through the real CLI reproduces
`evaluate_tiny.py --qwen` exactly, unpruned and pruned, across processes; its multiple-choice variant scores
options by loglikelihood through the family's own tokenizer (byte-level BPE) and prompt."""

from __future__ import annotations

import pytest

from minifastv.pruning import at_budget
from shapes import evaluate

N = 400
CASES = [("none", "", None), ("fastv-25%", "prune=fastv,prune_kept=4", ("fastv", 0.25, 2)),
         ("dart-50%", "prune=dart,prune_kept=8", ("dart", 0.5, 2))]


@pytest.fixture(scope="module")
def qwen_pipe():
    from minifastv.data import TINY_QWEN_MODEL
    from minifastv.pipeline import Pipeline

    return Pipeline.load(TINY_QWEN_MODEL, dtype="float32")


def model_args(args=""):
    from minifastv.data import TINY_QWEN_MODEL

    return f"pretrained={TINY_QWEN_MODEL}" + (f",{args}" if args else "")


@pytest.mark.parametrize("name,args,method", CASES, ids=[c[0] for c in CASES])
def test_task_reproduces_evaluate_tiny_qwen(runs, qwen_pipe, name, args, method):
    run = runs(f"qwen-{name}", model_args(args))
    reference = evaluate(qwen_pipe, N, prune=None if method is None else at_budget(*method))
    assert run.score() == reference["all"] and reference["all"] > 0.6
    for kind in ("colour", "shape_at", "count", "exists"):
        assert run.score(metric=kind) == reference[kind]
    stats = run.stats["tasks"]["minifastv_shapes"]
    assert stats["requests"] == N and stats["failed"] == 0
    assert stats["relative_prefill_flops"] == pytest.approx(reference["flops"], abs=1e-12)
    assert stats["kept_image_tokens"] == (16 if method is None else round(16 * method[1]))


def test_two_processes_answer_as_one(runs):
    one = runs("qwen-fastv-25%", model_args(CASES[1][1]))
    two = runs("qwen-fastv-2p", model_args(CASES[1][1]), processes=2, batch_size=8, limit=99)
    assert "Running on rank 1" in two.log
    assert two.answers() == {d: a for d, a in one.answers().items() if d < 99}


def test_multiple_choice_by_loglikelihood_is_a_plain_computation(runs, qwen_pipe):
    """minifastv_shapes_choice: each option scored as the assistant's answer (Qwen's BPE ids, then <|im_end|>)
    after Qwen's prompt; lmms-eval picks the smallest loss; the same from plain forwards here."""
    from test_lmms import choice_accuracy

    run = runs("qwen-choice", model_args(), tasks="minifastv_shapes_choice", limit=60)
    correct = choice_accuracy(qwen_pipe, 60)
    assert run.score("minifastv_shapes_choice", "acc") == correct
    assert correct > 0.6 and run.stats["tasks"]["minifastv_shapes_choice"]["failed"] == 0
