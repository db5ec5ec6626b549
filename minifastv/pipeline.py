"""A checkpoint's model and tokenizer together, and the way from images and a question to an answer with a
report of what the model did (image tokens kept, FLOPs, times)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .checkpoint import load, load_tokenizer
from .image import load_image
from .inputs import Batch, questions
from .models.generate import stream
from .models.llava import LlavaModel
from .pruning import Pruner
from .tokenizer import IMAGE_MARKER, Tokenizer


@dataclass
class Answer:
    text: str
    token_ids: list[int]            # the generated ids, EOS excluded
    n_prompt_tokens: int            # images counted as their patches
    n_image_tokens: int
    kept_image_slots: list[int]     # merged-sequence slots of the image tokens that survived pruning
    flops: int                      # theoretical decoder FLOPs of the prefill that ran
    flops_unpruned: int             # the same prefill without pruning
    prefill_s: float                # until the first token: vision tower + prefill
    decode_s: float
    decode_steps: int
    ended: bool = True              # False when the token budget ran out before EOS
    image_starts: list[int] = dataclasses.field(default_factory=list)  # each image's first slot, as kept_image_slots
    prompt_ids: list[int] = dataclasses.field(default_factory=list)  # the prompt as the model receives it: one id
    #   per image placeholder, no padding (rebuild a template's prompt from it, or check one)

    @classmethod
    def of(cls, tokenizer: Tokenizer, pre, i: int, ids: list[int], prefill_s: float, decode_s: float, steps: int,
           ended: bool, n_patches: int, prompt_ids: list[int] = ()) -> Answer:
        """Sample i of a Stream's run: its generated ids and what the prefill `pre` reports of it, kept image
        slots counted from the sample's own first slot (a batch left-pads it); n_patches: tokens per image."""
        padding = pre.valid.shape[1] - pre.n_prompt_tokens()[i]
        starts = (pre.image_mask[i].nonzero()[:, 0] - padding)[::n_patches].tolist()  # each image's first slot
        return cls(tokenizer.decode(ids), ids, pre.n_prompt_tokens()[i], pre.n_image_tokens()[i],
                   [s - padding for s in pre.kept_image_slots()[i]], pre.flops[i], pre.flops_unpruned[i],
                   prefill_s, decode_s, steps, ended, starts, list(prompt_ids))

    @property
    def kept(self) -> int:
        return len(self.kept_image_slots)

    def as_json(self) -> dict:
        """What generate --json prints: the fields (but `ended` and `image_starts`), the kept image token
        count and the kept patches per image."""
        fields = {key: value for key, value in dataclasses.asdict(self).items() if key not in ("ended", "image_starts")}
        return {**fields, "kept_image_tokens": self.kept, "kept_patches": self.kept_patches}

    @property
    def kept_patches(self) -> list[list[int]]:
        """Per image, the kept patches as row-major indices of its patch grid (what `analyze` prints), where
        kept_image_slots are positions in the prompt."""
        if not self.image_starts:
            return []
        n = self.n_image_tokens // len(self.image_starts)
        return [[s - start for s in self.kept_image_slots if start <= s < start + n] for start in self.image_starts]

    def summary(self) -> str:
        n, t = self.decode_steps, self.decode_s
        decode = f", decode {n} step{'' if n == 1 else 's'} in {t * 1e3:.0f} ms ({n / t:.1f} tokens/s)" if n else ""
        return (f"image tokens kept {self.kept}/{self.n_image_tokens}, theoretical prefill FLOPs "
                f"{self.flops / self.flops_unpruned:.1%}, prefill {self.prefill_s * 1e3:.0f} ms{decode}")


class Pipeline:
    """model + tokenizer. `Pipeline.load(path)` reads a checkpoint directory (keyword arguments as
    minifastv.load); `answer` asks one question about one or more images."""

    def __init__(self, model: LlavaModel, tokenizer: Tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> Pipeline:
        return cls(load(path, **kwargs), load_tokenizer(path))

    def inputs(self, images: Sequence[str | Path | Image.Image], question: str) -> Batch:
        """The single-turn prompt and the preprocessed images of one question (image files are read here)."""
        return self.questions([(images, question)])

    def questions(self, requests) -> Batch:
        """inputs.questions for (images, question) pairs whose images may be files (read here, and named by
        their path in error messages) or PIL images."""
        names = [str(im) if not isinstance(im, Image.Image) else f"image {i}"
                 for i, im in enumerate(im for images, _ in requests for im in images)]
        loaded = [([im if isinstance(im, Image.Image) else load_image(im) for im in images], q)
                  for images, q in requests]
        return questions(self.tokenizer, self.model.config, loaded, names)

    def answer(self, images, question: str, *, prune: Pruner | None = None, max_new_tokens: int = 64,
               temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
               on_text: Callable[[str], None] | None = None) -> Answer:
        """Greedy (or sampled) answer. on_text(piece) gets the answer as it is produced; the pieces join to
        exactly the decoded answer (subwords and multi-byte characters included)."""
        batch = self.inputs(images, question)
        run = stream(self.model, **batch.model_inputs(), max_new_tokens=max_new_tokens, prune=prune,
                     temperature=temperature, top_p=top_p, eos_token_id=self.model.config.text.eos_token_id,
                     generator=generator)
        return self.collect(run, on_text, prompt_ids(batch, 0))

    def answer_batch(self, requests, *, prune: Pruner | None = None, max_new_tokens: int = 64,
                     temperature: float = 0.0, top_p: float = 1.0,
                     generator: torch.Generator | None = None) -> list[Answer]:
        """Answers to (images, question) pairs run as one left-padded batch; each with the model's report of
        its own sample (kept image tokens, FLOPs), the batch's prefill time, and its own decode: the steps
        until its answer was complete (its EOS, or the token budget) and the time they took."""
        batch = self.questions(requests)
        eos = self.model.config.text.eos_token_id
        run = stream(self.model, **batch.model_inputs(), max_new_tokens=max_new_tokens, prune=prune,
                     temperature=temperature, top_p=top_p, eos_token_id=eos, generator=generator)
        start, steps, stamps = time.perf_counter(), [], []
        for tokens, _ in run:
            steps.append(tokens)
            stamps.append(time.perf_counter())  # stamps[0]: the prefill produced the first tokens
        rows, answers = torch.stack(steps, dim=1).tolist(), []
        for i, row in enumerate(rows):
            last = row.index(eos) if eos in row else len(row) - 1  # the step that completed this answer
            answers.append(Answer.of(self.tokenizer, run.prefill, i, row[:last + (eos not in row)],
                                     stamps[0] - start, stamps[last] - stamps[0], last, eos in row,
                                     self.model.config.vision.n_patches, prompt_ids(batch, i)))
        return answers

    def collect(self, run, on_text=None, prompt: list[int] = ()) -> Answer:
        """Run a one-sample Stream to its end (EOS or the token budget) into an Answer."""
        eos, text = self.model.config.text.eos_token_id, self.tokenizer.text_stream()
        start, out, first, steps = time.perf_counter(), [], None, 0
        for tokens, _ in run:
            if first is None:  # the prefill produced the first token
                first = time.perf_counter()
            else:
                steps += 1
            if int(tokens[0]) == eos:
                break
            out.append(int(tokens[0]))
            piece = text.push(out[-1])
            if on_text is not None and piece:
                on_text(piece)
        end = time.perf_counter()
        return Answer.of(self.tokenizer, run.prefill, 0, out, first - start, end - first, steps, steps + 1 > len(out),
                         self.model.config.vision.n_patches, prompt)


def prompt_ids(batch: Batch, i: int) -> list[int]:
    """Sample i's prompt ids in `batch`, without its left padding."""
    return batch.input_ids[i][batch.attention_mask[i].bool()].tolist()


class Chat:
    """A conversation about one image in LLaVA's vicuna_v1 multi-turn format. The first question encodes the
    image and prunes it (`prune`) once; later ones append "</s>USER: q ASSISTANT:" to the kept KV cache, so
    only their own tokens are computed. `reset()` starts over."""

    def __init__(self, pipe: Pipeline, image, *, prune: Pruner | None = None, **sampling):
        self.pipe, self.image, self.prune, self.sampling = pipe, image, prune, sampling
        self.reset()

    def reset(self):
        self.cache = self.position = None
        self.pending: list[int] = []  # generated tokens not yet in the cache: the last answer's end
        self.image_report: dict | None = None  # the first turn's image tokens, kept slots and image starts

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> Answer:
        tok, eos = self.pipe.tokenizer, self.pipe.model.config.text.eos_token_id
        if self.cache is None:
            batch = self.pipe.inputs([self.image], question)
            ids, pixels, prune = batch.input_ids, batch.pixel_values, self.prune
        else:
            if not question.strip() or IMAGE_MARKER in question:
                raise ValueError("a later question needs text, and no <image>: the conversation has its image")
            ids, pixels, prune = torch.tensor([self.pending + tok.encode_turn(question)]), None, None
        run = stream(self.pipe.model, ids, pixels, prune=prune, eos_token_id=eos, cache=self.cache,
                     position=self.position, **{"max_new_tokens": 256, **self.sampling})
        answer = self.pipe.collect(run, on_text)
        if self.image_report is None:
            self.image_report = {key: getattr(answer, key) for key in ("n_image_tokens", "kept_image_slots",
                                                                        "image_starts")}
        else:  # a later turn's prefill sees no image; the cache holds the first turn's kept image tokens
            answer = dataclasses.replace(answer, **self.image_report)
        self.cache, self.position = run.cache, run.position
        # The cache lacks the last token sampled: EOS, or the answer's last when the budget ran out (then an
        # EOS follows it): in training every answer ends with </s>.
        self.pending = [eos] if answer.ended else [answer.token_ids[-1], eos]
        return answer
