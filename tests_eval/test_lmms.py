"""minifastv as an lmms-eval model: the offline task through the real CLI reproduces evaluate_tiny.py, across
processes and batch sizes; loglikelihood against a plain computation; failures; multi-round; the sweep."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, lmms_eval, load_module

from minifastv.eval import TASKS
from minifastv.pruning import METHODS, AfterLayer, at_budget
from shapes import evaluate, example, write_task_data

TASK_DIR = TASKS / "minifastv_shapes"
N = 400  # the task's questions, evaluate_tiny's default


def budget(method, kept):
    """The method at `kept` of 64 image tokens as evaluate_tiny.py runs it (K=2 where a method has a layer)."""
    return None if method == "none" else at_budget(method, kept / 64, 2 if issubclass(METHODS[method], AfterLayer)
                                                   else None)


def docs(n=N):
    return [json.loads(line) for line in (TASK_DIR / "heldout.jsonl").read_text().splitlines()[:n]]


def test_task_data_is_the_held_out_split(tmp_path):
    write_task_data(tmp_path / "heldout.jsonl")
    assert (tmp_path / "heldout.jsonl").read_bytes() == (TASK_DIR / "heldout.jsonl").read_bytes()
    assert [d["question"] for d in docs(8)] == [example("heldout", i).question for i in range(8)]


# (method, image tokens kept of 64): the README's budgets, 50%, 25% and 12.5%
CASES = [("none", None), ("fastv", 32), ("dart", 16), ("pyramiddrop", 8), ("cdpruner", 16)]


@pytest.mark.parametrize("method,kept", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_task_reproduces_evaluate_tiny(runs, pipe, method, kept):
    args = "" if method == "none" else f"prune={method},prune_kept={kept}"
    run = runs(f"{method}-{kept}", args)
    reference = evaluate(pipe, N, prune=budget(method, kept))
    assert run.score() == reference["all"]
    for kind in ("colour", "shape_at", "count", "exists"):
        assert run.score(metric=kind) == reference[kind]
    stats = run.stats["tasks"]["minifastv_shapes"]
    assert stats["requests"] == N and stats["failed"] == 0
    assert stats["relative_prefill_flops"] == pytest.approx(reference["flops"], abs=1e-12)
    assert stats["kept_image_tokens"] == (64 if kept is None else kept)


def test_two_processes_answer_as_one(runs):
    one = runs("fastv-16", "prune=fastv,prune_kept=16")
    # 99 documents: rank 1 gets one fewer, and lmms-eval pads it with a copy that must not be counted
    two = runs("fastv-16-2p", "prune=fastv,prune_kept=16", processes=2, batch_size=8, limit=99)
    assert "Running on rank 1" in two.log
    assert two.answers() == {d: a for d, a in one.answers().items() if d < 99}
    assert two.score() == sum(s["exact_match"] for d, s in one.samples.items() if d < 99) / 99
    assert two.stats["tasks"]["minifastv_shapes"]["requests"] == 99
    assert sorted(r["doc_id"] for r in two.stats["requests"]) == list(range(99))


def test_batch_size_1_answers_as_16(runs):
    one = runs("fastv-16", "prune=fastv,prune_kept=16")
    single = runs("fastv-16-b1", "prune=fastv,prune_kept=16", batch_size=1, limit=99)
    assert single.answers() == {d: a for d, a in one.answers().items() if d < 99}


def test_reported_flops_and_kept_tokens_equal_generate_json(runs, tmp_path):
    run = runs("fastv-16", "prune=fastv,prune_kept=16")
    records = {r["doc_id"]: r for r in run.stats["requests"]}
    for doc in docs(2):
        image = tmp_path / f"{doc['id']}.png"
        image.write_bytes(base64.b64decode(doc["image"]))
        out = subprocess.run([sys.executable, "-m", "minifastv", "generate", "--image", str(image), "--prompt",
                              doc["question"], "--prune", "fastv", "--prune-ratio", "0.75", "--dtype", "float32",
                              "--max-new-tokens", "3", "--json"], capture_output=True, text=True, check=True)
        report = json.loads(out.stdout)
        mine = records[doc["id"]]
        assert (mine["kept_image_tokens"], mine["flops"], mine["flops_unpruned"], mine["image_tokens"]) == \
            (report["kept_image_tokens"], report["flops"], report["flops_unpruned"], report["n_image_tokens"])


# --- in-process: requests built by hand --------------------------------------------------------------------


def model(**kwargs):
    from minifastv.eval.lmms import MiniFastV

    m = MiniFastV(dtype="float32", **kwargs)
    m.task_dict = {"t": {"test": docs(8)}}
    return m


def request(kind, args, doc_id=0, idx=0, padding=False):
    from lmms_eval.api.instance import Instance

    metadata = {"task": "t", "doc_id": doc_id, "repeats": 1, **({"__padding_only__": True} if padding else {})}
    return Instance(request_type=kind, arguments=args, idx=idx, metadata=metadata)


def visual(doc):
    from PIL import Image

    return [Image.open(io.BytesIO(base64.b64decode(doc["image"])))] if doc.get("image") else []


def generation(doc_id, gen_kwargs=None, **kw):
    return request("generate_until", (docs(8)[doc_id]["question"], gen_kwargs or {"max_new_tokens": 3}, visual,
                                      doc_id, "t", "test"), doc_id, **kw)


@torch.no_grad()
@pytest.mark.parametrize("prune", [None, "fastv"])
def test_loglikelihood_is_a_plain_computation_on_the_logits(pipe, prune):
    """Unpruned: one forward pass over prompt + answer + EOS. FastV: the context alone decides the kept image
    tokens (its last token ranks them); then a forward pass over the whole sequence that keeps those tokens."""
    KeepIndices = load_module(ROOT / "tests" / "test_chat.py").KeepIndices

    m = model(**({} if prune is None else {"prune": prune, "prune_kept": 24}))
    eos = pipe.tokenizer.eos_token_id
    for doc_id in (0, 1):
        doc = docs(2)[doc_id]
        batch = pipe.inputs(visual(doc), doc["question"])
        keep = None
        if prune:
            pre = pipe.model.prefill(**batch.model_inputs(), prune=m.prune)
            first = int(pre.image_mask[0].nonzero()[0])
            keep = KeepIndices(2, tuple(s - first for s in pre.kept_image_slots()[0]))
        options = ["red", "green", "blue", "yellow"]
        got = m.loglikelihood([request("loglikelihood", (doc["question"], f" {o}", visual, doc_id, "t", "test"),
                                       doc_id, i) for i, o in enumerate(options)])
        for option, result in zip(options, got):
            answer = pipe.tokenizer.encode_text(option) + [eos]
            ids = torch.cat([batch.input_ids, torch.tensor([answer])], dim=1)
            logits = pipe.model(ids, batch.pixel_values, prune=keep)[0, -len(answer) - 1:-1].float()
            loss, greedy = result.text
            assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.tensor(answer))),
                                         abs=1e-5)
            assert greedy == bool((logits.argmax(-1) == torch.tensor(answer)).all())


def test_multiple_choice_task_through_the_cli(runs, pipe):
    """minifastv_shapes_choice: lmms-eval picks the option of smallest loss; the same from plain forwards."""
    run = runs("choice", tasks="minifastv_shapes_choice", limit=60)
    correct = choice_accuracy(pipe, 60)
    assert run.score("minifastv_shapes_choice", "acc") == correct
    assert correct > 0.8  # the model reads the image: the options are not guessed


@torch.no_grad()
def choice_accuracy(pipe, n: int) -> float:
    """The choice task's accuracy on its first n documents from plain forwards: each option scored as the
    assistant's answer ended by EOS (mean cross-entropy), the smallest loss chosen."""
    utils, eos, correct = load_module(TASK_DIR / "utils.py"), pipe.tokenizer.eos_token_id, 0
    for doc in docs(n):
        batch = pipe.inputs(visual(doc), doc["question"])
        losses = []
        for option in utils.doc_to_choice(doc):
            answer = pipe.tokenizer.encode_text(option) + [eos]
            ids = torch.cat([batch.input_ids, torch.tensor([answer])], dim=1)
            logits = pipe.model(ids, batch.pixel_values)[0, -len(answer) - 1:-1].float()
            losses.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(answer))))
        correct += utils.doc_to_choice(doc)[losses.index(min(losses))] == doc["answer"]
    return correct / n


def test_failed_requests_are_reported_and_the_run_finishes(tmp_path, pipe):
    task = tmp_path / "broken"
    task.mkdir()
    shutil.copy(TASK_DIR / "utils.py", task / "utils.py")
    (task / "broken.yaml").write_text((TASK_DIR / "minifastv_shapes.yaml").read_text()
                                      .replace("task: minifastv_shapes", "task: broken")
                                      .replace("heldout.jsonl", "broken.jsonl"))
    rows = docs(6)
    rows[1]["image"] = None                                                    # no image
    rows[2]["image"] = base64.b64encode(base64.b64decode(rows[2]["image"])[:60]).decode()  # a truncated PNG
    rows[3]["question"] = "what colour is the zebra?"                          # a word the model lacks
    rows[4]["question"] = "is there a shape in row one column one? " * 60      # over the context of 512
    (task / "broken.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = lmms_eval(tmp_path / "out", tasks="broken", include=task)
    answers = run.answers()
    for d in (0, 5):  # the others are answered as they are alone
        assert answers[d] == pipe.answer(visual(rows[d]), rows[d]["question"], max_new_tokens=3).text.strip() != ""
    assert all(answers[d] == "" for d in (1, 2, 3, 4))
    errors = {r["doc_id"]: r["error"] for r in run.stats["requests"] if "error" in r}
    assert set(errors) == {1, 2, 3, 4}
    assert "no image" in errors[1] and "not a readable image" in errors[2]
    assert "zebra" in errors[3] and "context of 512" in errors[4]
    assert "task broken, document 2" in run.log
    assert run.stats["tasks"]["broken"]["failed"] == 4


def test_multi_round_requests_are_a_conversation_on_the_cache(tmp_path, pipe):
    from minifastv.pipeline import Chat

    task = tmp_path / "rounds"
    task.mkdir()
    (task / "rounds.yaml").write_text(f"""task: rounds
dataset_path: json
dataset_kwargs:
  data_files:
    test: {TASK_DIR / 'heldout.jsonl'}
test_split: test
output_type: generate_until_multi_round
doc_to_visual: !function rounds.doc_to_visual
doc_to_text: !function rounds.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
process_results: !function rounds.process_results
metric_list:
  - metric: first_round
    aggregation: mean
    higher_is_better: true
""")
    (task / "rounds.py").write_text(f"""import sys
sys.path.insert(0, {str(TASK_DIR)!r})
from utils import doc_to_visual

SECOND = "how many shapes are in row one?"


def doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None, previous_round_info=None):
    if round_idx is None:
        return doc["question"]
    return (None, SECOND, round_idx >= 2, previous_output, None)


def process_results(doc, results):
    return {{"first_round": float(results[0][0] == doc["answer"])}}
""")
    run = lmms_eval(tmp_path / "out", "prune=fastv,prune_kept=16", tasks="rounds", include=task, limit=4)
    for doc in docs(4):
        chat = Chat(pipe, visual(doc)[0], prune=budget("fastv", 16), max_new_tokens=3)
        expected = [chat.ask(doc["question"]).text.strip(), chat.ask("how many shapes are in row one?").text.strip()]
        logged = run.samples[doc["id"]]["filtered_resps"]
        assert [a.strip() for a in (logged[0] if isinstance(logged[0], list) else logged)] == expected


def test_model_args_and_generation_kwargs_reach_the_model(monkeypatch):
    from minifastv.eval.lmms import Sampling

    threads = torch.get_num_threads()
    try:
        m = model(prune="random", prune_kept=16, prune_k=1, prune_seed=3, batch_size=3, threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert (m.prune.k, m.prune.seed, m.prune.ratio, m.batch_size) == (1, 3, 0.75, 3)
    assert model(prune="fastv", prune_ratio=0.25).prune.ratio == 0.25
    calls = []
    real = m.pipe.answer_batch

    def spy(requests, **kwargs):  # the real answers, with times that show how a batch's time is shared
        calls.append((len(requests), kwargs))
        answers = real(requests, **kwargs)
        for a in answers:
            a.prefill_s, a.decode_s = 6.0 * len(requests), 3.0 * len(requests)
        return answers

    monkeypatch.setattr(m.pipe, "answer_batch", spy)
    kwargs = {"max_new_tokens": 2, "temperature": 0.5, "top_p": 0.9, "do_sample": True, "until": ["e"]}
    out = m.generate_until([generation(d, dict(kwargs)) for d in range(7)])
    assert [n for n, _ in calls] == [3, 3, 1]
    assert {(k["max_new_tokens"], k["temperature"], k["top_p"]) for _, k in calls} == {(2, 0.5, 0.9)}
    assert not any("e" in text for text in out) and all(c["prune"] is m.prune for _, c in calls)
    assert {(r["prefill_s"], r["decode_s"]) for r in m.records.values()} == {(6.0, 3.0)}
    calls.clear()
    m.generate_until([generation(0, {"max_new_tokens": 1}), generation(1, {"max_new_tokens": 2})])
    assert sorted(k["max_new_tokens"] for _, k in calls) == [1, 2]  # one batch per setting
    assert Sampling.of({"temperature": 0.7, "do_sample": False}).temperature == 0
    assert Sampling.of({"do_sample": True}).temperature == 1.0
    assert Sampling.of({"until": "row"}).cut("red row two") == "red "


def test_threads_are_shared_among_the_machines_processes(monkeypatch):
    import minifastv.eval.lmms as lmms

    threads = torch.get_num_threads()
    monkeypatch.setattr(lmms, "physical_cores", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    try:
        model()
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)


def test_image_markers_in_the_context():
    from minifastv.eval.lmms import MiniFastV, RequestError

    image = visual(docs(1)[0])
    assert MiniFastV.question("<image>\nwhat colour is it?", image) == "what colour is it?"
    assert MiniFastV.question("what colour is it? ", image) == "what colour is it?"
    with pytest.raises(RequestError, match="2 <image> marker"):
        MiniFastV.question("<image> <image> what?", image)


def test_multi_round_keeps_one_conversation(monkeypatch):
    """Every round of a request asks the same Chat (its cache), and the task sees the answers so far."""
    from minifastv.pipeline import Chat

    asked, seen = [], []
    real = Chat.ask

    def spy(self, question, on_text=None):
        asked.append((id(self), question))
        return real(self, question, on_text)

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append(list(previous_output))
        return None, "how many shapes are in row one?", round_idx >= 3, previous_output, None

    monkeypatch.setattr(Chat, "ask", spy)
    m = model()
    args = (docs(1)[0]["question"], {"max_new_tokens": 3}, visual, doc_to_text, 0, "t", "test")
    out = m.generate_until_multi_round([request("generate_until_multi_round", args)])
    assert len(out[0]) == 3 and len({chat for chat, _ in asked}) == 1
    assert [q for _, q in asked] == [docs(1)[0]["question"]] + ["how many shapes are in row one?"] * 2
    assert seen == [out[0][:1], out[0][:2], out[0]]


def test_requests_without_an_image_and_padding_requests():
    doc = {**docs(1)[0], "image": None}
    m = model()
    m.task_dict["t"]["test"] = [doc]
    assert m.generate_until([generation(0)]) == [""]
    assert "no image" in m.records[("t", 0, 0)]["error"]
    m = model(require_image=False, prune="fastv", prune_kept=16)  # text-only requests beside pruned ones
    m.task_dict["t"]["test"] = [doc] + docs(2)[1:]
    m.generate_until([generation(0), generation(1)])
    assert "error" not in m.records[("t", 0, 0)] and m.records[("t", 0, 0)]["image_tokens"] == 0  # text-only
    assert m.records[("t", 1, 0)]["kept_image_tokens"] == 16
    (loss, _), = [r.text for r in m.loglikelihood([request("loglikelihood", (doc["question"], " red", visual, 0, "t",
                                                                                    "test"))])]
    assert 0 < loss < float("inf")
    m = model()
    m.generate_until([generation(0), generation(0, padding=True), generation(1)])
    assert sorted(m.records) == [("t", 0, 0), ("t", 1, 0)] and len(m.records) == 2


@pytest.mark.parametrize("bad,message", [({"bogus": 1}, "unknown minifastv model_args: bogus"),
                                         ({"prune": "fastv", "prune_ratio": 0.5, "prune_kept": 16}, "not both"),
                                         ({"prune": "fastv", "prune_kept": 65}, "has 64 tokens"),
                                         ({"prune_k": 2}, "need prune=METHOD"),
                                         ({"prune": "nope"}, "unknown pruning method"),
                                         ({"batch_size": 0}, "batch_size"),
                                         ({"activations": "int4"}, "activations must be one of float, int8"),
                                         ({"activations": "int8"}, "int8 activations need an int8-quantized")])
def test_bad_model_args_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        model(**bad)


def test_activations_int8_reaches_an_int8_checkpoint(tmp_path):
    """activations=int8 sets the int8 checkpoint's linears to integer activations (weight-only by default)."""
    from minifastv.checkpoint import quantize_checkpoint
    from minifastv.config import QuantConfig
    from minifastv.data import TINY_MODEL
    from minifastv.quant.int8act import int8_gemm_exact
    from minifastv.quant.linear import Int8Linear

    q8 = quantize_checkpoint(TINY_MODEL, tmp_path / "q8", QuantConfig("int8"), log=lambda _: None)
    kinds = lambda m: {x.activations for x in m.pipe.model.modules() if isinstance(x, Int8Linear)}  # noqa: E731
    assert kinds(model(pretrained=str(q8))) == {"float"}
    if int8_gemm_exact():
        assert kinds(model(pretrained=str(q8), activations="int8")) == {"int8"}


@pytest.mark.parametrize("bad,message", [({"num_beams": 4}, "no beam search"), ({"penalty": 1}, "penalty"),
                                         ({"until": [1]}, "until")])
def test_unsupported_generation_kwargs_are_named(bad, message):
    from minifastv.eval.lmms import Sampling

    with pytest.raises(ValueError, match=message):
        Sampling.of(bad)


def test_sweep_writes_a_table_and_skips_what_is_done(tmp_path, pipe):
    cmd = [sys.executable, "-m", "minifastv.eval", "sweep", "--methods", "uniform,fastv", "--kept", "16",
           "--limit", "40", "--batch-size", "8", "--dtype", "float32", "--out", str(tmp_path / "sweep")]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = json.loads((tmp_path / "sweep" / "table.json").read_text())
    assert [(r["method"], r["kept"]) for r in rows] == [("none", None), ("uniform", 16), ("fastv", 16)]
    for r in rows:
        reference = evaluate(pipe, 40, prune=budget(r["method"], 16))
        assert (r["score"], r["relative_prefill_flops"]) == pytest.approx((reference["all"], reference["flops"]))
    assert "| minifastv_shapes | exact_match | fastv | 16 |" in first.stdout
    assert (tmp_path / "sweep" / "accuracy_minifastv_shapes.png").is_file()
    again = subprocess.run(cmd + ["--metric", "minifastv_shapes=colour"], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0 and again.stderr.count("done, skipped") == 3
    rows = json.loads((tmp_path / "sweep" / "table.json").read_text())
    assert {r["metric"] for r in rows} == {"colour"}
    assert rows[0]["score"] == evaluate(pipe, 40)["colour"]
    dry = subprocess.run(cmd + ["--processes", "2", "--prune-k", "1", "--dry-run"], capture_output=True, text=True,
                         cwd=ROOT)
    assert dry.stdout.count("accelerate.commands.launch --multi_gpu --num_processes 2") == 3
    assert "prune=fastv,prune_kept=16,prune_k=1" in dry.stdout and "--batch_size 8" in dry.stdout
    assert "prune=uniform,prune_kept=16 " in dry.stdout  # uniform has no layer
    assert dry.stdout.count("dtype=float32") == 3 and dry.stdout.count("--limit 40") == 3


def test_tasks_directory_is_printed():
    out = subprocess.run([sys.executable, "-m", "minifastv.eval", "tasks"], capture_output=True, text=True)
    assert Path(out.stdout.strip()) == TASKS and (Path(out.stdout.strip()) / "minifastv_shapes").is_dir()
