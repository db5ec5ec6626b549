"""A conversation about one image: later turns go through the kept KV cache and equal a fresh prefill of the
whole conversation that keeps the same image tokens."""

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

import train_tiny
from minifastv import FastV
from minifastv.data import SAMPLES
from minifastv.models.generate import Stream
from minifastv.pipeline import Chat
from minifastv.pruning import Pruner, Stage

IMAGE = SAMPLES / "heldout_0.png"


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe  # trained: its answers are words, then EOS


@dataclass(frozen=True)
class KeepIndices(Pruner):
    """Before layer `k`, exactly these image tokens (by rank among the image tokens)."""

    k: int
    indices: tuple

    def stages(self, n_layers):
        return [Stage(self.k, len(self.indices) / 64)]

    def select(self, ctx):
        return ctx.image_mask & torch.isin(ctx.image_index(), torch.tensor(self.indices))


@torch.no_grad()
@pytest.mark.parametrize("budget", [3, 1], ids=["ends-at-eos-or-budget", "budget-runs-out"])
def test_later_turns_through_the_cache_equal_a_fresh_prefill(pipe, budget, monkeypatch):
    import minifastv.pipeline

    logits_seen = []

    def recording(*args, **kwargs):  # the Stream the chat runs, with the logits of every token it yields
        run = Stream(*args, **kwargs)

        class Recorded:
            def __iter__(self):
                for tokens, logits in run:
                    logits_seen.append(logits[0])
                    yield tokens, logits

            def __getattr__(self, name):
                return getattr(run, name)
        return Recorded()

    monkeypatch.setattr(minifastv.pipeline, "stream", recording)
    chat = Chat(pipe, IMAGE, prune=FastV(2, 0.5), max_new_tokens=budget)
    questions = ["what colour is the circle?", "which shape is in row one column one?", "how many shapes are there?"]
    answers = [chat.ask(q) for q in questions]
    assert all(a.token_ids for a in answers)
    first = pipe.inputs([IMAGE], questions[0])
    image_slot = int((first.input_ids[0] == pipe.tokenizer.image_token_id).nonzero())
    kept = tuple(s - image_slot for s in answers[0].kept_image_slots)
    assert len(kept) == 32
    fixed = KeepIndices(2, kept)
    eos = pipe.model.config.text.eos_token_id
    seq = first.input_ids[0].tolist()
    for question, answer in zip(questions, answers):
        if question != questions[0]:
            seq += pipe.tokenizer.encode_turn(question)
        for token in answer.token_ids:                      # each answer token, recomputed from scratch
            logits = pipe.model(torch.tensor([seq]), first.pixel_values, prune=fixed)[0, -1]
            assert (logits - logits_seen.pop(0)).abs().max() <= 1e-4 and int(logits.argmax()) == token
            seq.append(token)
        if answer.ended:
            logits_seen.pop(0)                              # the logits that chose EOS
        seq.append(eos)                                     # every answer ends with </s>
    assert not logits_seen
    assert answers[1].n_prompt_tokens < 20                 # only the new turn was computed
    # ... and its report is the conversation's image, as the cache holds it: 32 of 64 kept, the first turn's
    assert all((a.n_image_tokens, a.kept_image_slots, a.kept_patches) ==
               (64, answers[0].kept_image_slots, answers[0].kept_patches) for a in answers[1:])
    assert len(answers[2].kept_patches[0]) == 32


def test_reset_starts_over(pipe):
    """After /reset the next answer is a fresh chat's first: the same tokens, the image encoded and pruned
    again, the prompt as long as a first turn's (no history) and the positions counted from the start."""
    prune = FastV(2, 0.75)
    fresh = Chat(pipe, IMAGE, prune=prune, max_new_tokens=2)
    first = fresh.ask("what colour is the circle?")
    chat = Chat(pipe, IMAGE, prune=prune, max_new_tokens=2)
    chat.ask("how many shapes are there?")
    chat.ask("which shape is in row one column one?")
    chat.reset()
    assert chat.cache is None and chat.position is None and chat.pending == []
    again = chat.ask("what colour is the circle?")
    assert again.token_ids == first.token_ids and again.kept_image_slots == first.kept_image_slots
    assert (again.n_prompt_tokens, again.n_image_tokens, again.kept) == (first.n_prompt_tokens, 64, 16)
    assert torch.equal(chat.position, fresh.position) and chat.cache.lengths() == fresh.cache.lengths()


def test_chat_command_reads_questions_until_end_of_input(tmp_path):
    import minifastv

    tok = train_tiny.build_tokenizer()
    minifastv.save(train_tiny.build_model(tok, seed=4), tok, tmp_path / "m")
    lines = "what colour is the circle?\n\nzebra?\nhow many shapes are there?\n/reset\nwhat colour is the circle?\n"
    result = subprocess.run([sys.executable, "-m", "minifastv", "chat", "--model", str(tmp_path / "m"), "--image",
                             str(IMAGE), "--max-new-tokens", "2", "--prune", "fastv"], input=lines, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1, result.stderr            # piped: a failed question makes the exit status 1 ...
    assert result.stderr.endswith("error: 1 question failed\n")
    assert result.stdout.count("\n") == 3                   # ... after the three answers; the unknown word erred
    answers = result.stdout.splitlines()
    fresh = subprocess.run([sys.executable, "-m", "minifastv", "chat", "--model", str(tmp_path / "m"), "--image",
                            str(IMAGE), "--max-new-tokens", "2", "--prune", "fastv"],
                           input="what colour is the circle?\n",
                           capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr
    assert answers[2] == answers[0] == fresh.stdout.strip()  # after /reset: the first turn's answer again
    # the turn after /reset encodes and prunes the image again: kept tokens and FLOPs are a first turn's
    heads = [line.split(", prefill ")[0] for line in result.stderr.splitlines() if line.startswith("image tokens")]
    assert heads[2] == heads[0] and "kept 32/64" in heads[0] and heads[1] != heads[0]
    assert "does not know 'zebra'" in result.stderr and "starts over" in result.stderr
    assert "Traceback" not in result.stderr


def chat_in_process(monkeypatch, capsys, lines, *options, ask=None):
    """`chat` on the shipped model with `lines` as standard input (ask: a stand-in for Chat.ask)."""
    import io

    from minifastv.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    if ask is not None:
        monkeypatch.setattr(Chat, "ask", ask)
    code = main(["chat", "--image", str(IMAGE), "--max-new-tokens", "3", "--dtype", "float32", *options])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("image,message", [("missing.png", "missing.png: image file not found"),
                                           ("broken.png", "broken.png: not a readable image")])
def test_chat_checks_its_image_before_the_first_question(monkeypatch, capsys, tmp_path, image, message):
    from minifastv.cli import main

    (tmp_path / "broken.png").write_bytes(IMAGE.read_bytes()[:40])
    asked = []
    monkeypatch.setattr(Chat, "ask", lambda self, *a, **k: asked.append(a))
    code = main(["chat", "--image", str(tmp_path / image)])
    assert code == 2 and message in capsys.readouterr().err and not asked


@pytest.mark.parametrize("given", [["--image", "I", "--image", "I"], ["--image", "I", "--video", "V"], []])
def test_chat_takes_one_image_or_one_video(capsys, given):
    from minifastv.cli import main
    from minifastv.data import SAMPLES

    files = {"I": str(IMAGE), "V": str(SAMPLES / "heldout_video_0.mkv")}
    assert main(["chat", *[files.get(a, a) for a in given]]) == 2
    assert f"chat is about one image or one video, got {len(given) // 2} (--image, --video)" in capsys.readouterr().err


def test_answers_get_what_is_left_of_the_context_and_a_full_one_says_to_reset(monkeypatch, capsys):
    """500 new tokens asked for on the 512-token tiny model: each answer gets what is left (as the server clamps),
    so the conversation goes on until no room is left at all, and only then says to reset."""
    code, out, err = chat_in_process(monkeypatch, capsys, "what colour is the circle?\n" * 40, "--max-new-tokens",
                                     "500")
    answered = [line for line in out.splitlines() if line]
    assert code == 1 and len(answered) > 20                 # piped: a question that failed fails the command
    assert err.count("error: the conversation fills the model's context of 512 tokens; /reset starts a new "
                     "conversation") == 40 - len(answered)


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(monkeypatch, capsys, pipe):
    real, calls = Chat.ask, []

    def ask(self, question, on_text=None):
        calls.append(question)
        if len(calls) == 1:
            self.cache = "half-written"                        # what an interrupted turn leaves behind
            raise KeyboardInterrupt
        return real(self, question, on_text)

    code, out, err = chat_in_process(monkeypatch, capsys, "which shape is in row one column one?\n"
                                     "what colour is the circle?\n", ask=ask)
    assert code == 0 and "answer interrupted; the conversation starts over" in err and "Traceback" not in err
    fresh = Chat(pipe, IMAGE, max_new_tokens=3).ask("what colour is the circle?")
    assert out.strip() == fresh.text                            # the next question starts a fresh conversation


def test_ctrl_c_at_the_prompt_leaves(monkeypatch, capsys):
    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    code, out, err = chat_in_process(monkeypatch, capsys, "")
    assert code == 0 and "Traceback" not in err


def test_a_terminal_gets_a_prompt_marker(tmp_path):
    """On a terminal (a pseudo-terminal here) each question is asked for with "> "; piped input gets none."""
    import os
    import pty

    main_fd, child_fd = pty.openpty()
    result = subprocess.Popen([sys.executable, "-m", "minifastv", "chat", "--image", str(IMAGE), "--max-new-tokens",
                               "2"], stdin=child_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(child_fd)
    os.write(main_fd, b"what colour is the circle?\n\x04")
    out, err = result.communicate(timeout=120)
    os.close(main_fd)
    assert result.returncode == 0, err
    assert out.startswith("> ") and out.count("> ") == 2  # asked twice: the question, then end of input
