"""`python -m minifastv.eval sweep` without lmms-eval: budgets checked against the model before anything runs,
defaults that fit it, a run with failed requests is a failed sweep, and the stats file's order."""

import json

import pytest

from minifastv.eval.stats import summarize
from minifastv.eval.sweep import default_budgets, main, run_failures


def test_the_default_budgets_are_the_literatures_shares_of_the_models_tokens():
    assert default_budgets(576) == [64, 128, 192] and default_budgets(64) == [7, 14, 21]


def test_the_defaults_fit_the_tiny_model(capsys):
    assert main(["--methods", "fastv,pyramiddrop", "--dry-run"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert len(commands) == 7 and all(f"prune_kept={k}" in commands[1 + i] for i, k in enumerate([7, 14, 21]))


@pytest.mark.parametrize("kept, message", [("64", "--kept 64: the model's images have 64 tokens; a budget is 1..63"),
                                           ("128", "--kept 128: the model's images have 64 tokens"),
                                           ("0", "--kept 0:")])
def test_a_budget_the_model_cannot_keep_is_refused_before_anything_runs(kept, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--kept", "16", kept, "--out", str(tmp_path / "sweep")])
    assert e.value.code == 2 and message in capsys.readouterr().err and not (tmp_path / "sweep").exists()


def test_a_llava_next_model_is_refused_before_anything_runs(tmp_path, capsys):
    from minifastv.data import TINY_NEXT_MODEL

    with pytest.raises(SystemExit) as e:
        main(["--model", str(TINY_NEXT_MODEL), "--out", str(tmp_path / "sweep")])
    assert e.value.code == 2 and "run lmms-eval with prune_ratio instead" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_a_run_with_failed_requests_is_named_and_run_again_next_time(tmp_path):
    run = tmp_path / "fastv-16"
    run.mkdir()
    ok = {"task": "t", "doc_id": 1}
    (run / "stats.json").write_text(json.dumps({"requests": [ok, {"task": "t", "doc_id": 2, "error": "boom"}]}))
    assert run_failures(run) == "1 of 2 requests failed, the first (task t, document 2): boom"
    assert not (run / "stats.json").exists() and (run / "stats.failed.json").is_file()
    assert run_failures(run) == "it wrote no stats.json"
    (run / "stats.json").write_text(json.dumps({"requests": [ok]}))
    assert run_failures(run) is None


def test_stats_list_requests_in_document_order():
    records = [{"task": "t", "doc_id": i, "error": "x"} for i in (10, 2, 1)]
    records.append({"task": "s", "doc_id": "b", "error": "x"})
    assert [(r["task"], r["doc_id"]) for r in summarize(records)["requests"]] == [("s", "b"), ("t", 1), ("t", 2),
                                                                                 ("t", 10)]
