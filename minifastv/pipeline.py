"""A checkpoint's model and tokenizer together, and the way from images or videos and a question to an answer
with a report of what the model did (visual tokens kept, FLOPs, times)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .anyres import BASE, kept_on_grid
from .checkpoint import load, load_tokenizer
from .image import load_image
from .inputs import Batch, every_image_and_video, questions
from .models.generate import stream
from .models.llava import LlavaModel
from .pruning import Pruner
from .tokenizer import Tokenizer


@dataclass
class Answer:
    text: str
    token_ids: list[int]            # the generated ids, EOS excluded
    n_prompt_tokens: int            # images and videos counted as their tokens
    n_image_tokens: int             # visual tokens: images' and videos'
    kept_image_slots: list[int]     # merged-sequence slots of the visual tokens that survived pruning
    flops: int                      # theoretical decoder FLOPs of the prefill that ran
    flops_unpruned: int             # the same prefill without pruning
    prefill_s: float                # until the first token: vision tower + prefill
    decode_s: float
    decode_steps: int
    ended: bool = True              # False when the token budget ran out before EOS
    groups: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)  # per image and per video frame,
    #   in prompt order: (first slot, as kept_image_slots; tokens; the frame's index in its video, -1 for an image)
    prompt_ids: list[int] = dataclasses.field(default_factory=list)  # the prompt as the model receives it: one id
    #   per image or video placeholder, no padding (rebuild a template's prompt from it, or check one)
    parts: list[int] = dataclasses.field(default_factory=list)  # LLaVA-NeXT: per prompt slot, what it holds
    #   (anyres.BASE, TILE, NEWLINE; 0 text); empty for the other families

    @classmethod
    def of(cls, tokenizer: Tokenizer, pre, i: int, ids: list[int], prefill_s: float, decode_s: float, steps: int,
           ended: bool, model, prompt_ids: list[int]) -> Answer:
        """Sample i of a Stream's run: its generated ids and what the prefill `pre` reports of it, kept visual
        slots counted from the sample's own first slot (a batch left-pads it); prompt_ids: its prompt unpadded."""
        padding = pre.valid.shape[1] - pre.n_prompt_tokens()[i]
        parts = getattr(pre, "parts", None)
        return cls(tokenizer.decode(ids), ids, pre.n_prompt_tokens()[i], pre.n_image_tokens()[i],
                   [s - padding for s in pre.kept_image_slots()[i]], pre.flops[i], pre.flops_unpruned[i],
                   prefill_s, decode_s, steps, ended, visual_groups(model, prompt_ids), list(prompt_ids),
                   [] if parts is None else parts[i, padding:].tolist())

    @property
    def kept(self) -> int:
        return len(self.kept_image_slots)

    def as_json(self) -> dict:
        """What generate --json prints: the fields (but `ended`, `groups` and `parts`), the kept visual token count,
        the kept patches per image and per video frame, per video the frames whose class token was kept, and per
        LLaVA-NeXT image its kept cells of the tile grid."""
        fields = {key: value for key, value in dataclasses.asdict(self).items()
                  if key not in ("ended", "groups", "parts")}
        videos = {"kept_class_tokens": self.kept_class_tokens} if self.has_video else {}
        tiles = {"kept_grid": self.kept_grid} if self.parts else {}
        return {**fields, "kept_image_tokens": self.kept, "kept_patches": self.kept_patches, **videos, **tiles}

    def kept_in(self, start: int, n: int) -> list[int]:
        return [s - start for s in self.kept_image_slots if start <= s < start + n]

    @property
    def kept_patches(self) -> list[list[int]]:
        """Per image and per video frame (in prompt order), the kept patches as row-major indices of its patch grid
        (what `analyze` prints; LLaVA-NeXT: of its base image, see kept_grid for the tiles), where
        kept_image_slots are positions in the prompt."""
        out = []
        for start, n, frame in self.groups:
            lead = 1 if frame >= 0 else 0  # a video frame's class token comes before its patches
            base = self.parts[start:start + n].count(BASE) if self.parts else n
            out.append([s - lead for s in self.kept_in(start, n) if lead <= s < base])
        return out

    @property
    def kept_grid(self) -> list[dict]:
        """LLaVA-NeXT: per image, its kept tokens on the tile grid (anyres.kept_on_grid: the grid's rows and cols,
        the kept cells row-major, the rows whose newline token was kept)."""
        return [kept_on_grid(self.parts[start:start + n], self.kept_in(start, n)) for start, n, _ in self.groups]

    @property
    def kept_class_tokens(self) -> list[list[int]]:
        """Per video, the frames whose class token (a frame's first token) was kept."""
        out = []
        for start, n, f in self.groups:
            if f == 0:
                out.append([])
            if f >= 0 and 0 in self.kept_in(start, n):
                out[-1].append(f)
        return out

    @property
    def has_video(self) -> bool:
        return any(f >= 0 for *_, f in self.groups)

    def summary(self) -> str:
        n, t = self.decode_steps, self.decode_s
        decode = f", decode {n} step{'' if n == 1 else 's'} in {t * 1e3:.0f} ms ({n / t:.1f} tokens/s)" if n else ""
        kind = "visual" if self.has_video else "image"
        return (f"{kind} tokens kept {self.kept}/{self.n_image_tokens}, theoretical prefill FLOPs "
                f"{self.flops / self.flops_unpruned:.1%}, prefill {self.prefill_s * 1e3:.0f} ms{decode}")


def visual_groups(model, prompt_ids: list[int]) -> list[tuple[int, int, int]]:
    """Where each image and each video frame lies in the merged sequence of one unpadded prompt: (first slot,
    tokens, the frame's index in its video or -1 for an image). A frame's first token is its class token."""
    spans, cfg = model.spans(), model.config
    video_id, n_frames = getattr(model, "video_placeholder", None), getattr(cfg, "n_frames", 1)
    per_frame = getattr(cfg, "frame_token_id", None) is not None  # the original's layout: a placeholder a frame
    per_token = getattr(cfg, "placeholder_per_token", False)      # LLaVA-NeXT: an image is a run of placeholders
    groups, slot, frames_seen = [], 0, 0
    for token in prompt_ids:
        n = spans.get(token, 1)
        if token == video_id and per_frame:
            groups.append((slot, n, frames_seen % n_frames))
            frames_seen += 1
        elif token == video_id:
            groups += [(slot + f * (n // n_frames), n // n_frames, f) for f in range(n_frames)]
        elif token == cfg.image_token_id and per_token and groups and sum(groups[-1][:2]) == slot:
            groups[-1] = (groups[-1][0], groups[-1][1] + n, -1)
        elif token == cfg.image_token_id:
            groups.append((slot, n, -1))
        slot += n
    return groups


class Pipeline:
    """model + tokenizer. `Pipeline.load(path)` reads a checkpoint directory (keyword arguments as
    minifastv.load); `answer` asks one question about one or more images."""

    def __init__(self, model: LlavaModel, tokenizer: Tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> Pipeline:
        model = load(path, **kwargs)
        # a CLIP text tower holds the decoder's tokenizer already (checkpoint.load): not read a second time
        return cls(model, model.clip_text.tokenizers[0] if model.clip_text is not None else load_tokenizer(path))

    def inputs(self, images: Sequence[str | Path | Image.Image], question: str, videos: Sequence = ()) -> Batch:
        """The single-turn prompt and the preprocessed images and videos of one question (files are read here)."""
        return self.questions([(images, question, videos)])

    def questions(self, requests) -> Batch:
        """inputs.questions for (images, question) or (images, question, videos) requests whose images may be
        files (read here, and named by their path in error messages) or PIL images, and whose videos may be
        files (read with PyAV, the [video] extra), lists of PIL frames or preprocessed [frames, 3, S, S]."""
        every_image, every_video = every_image_and_video(requests)
        names = [f"image {i}" if isinstance(im, Image.Image) else str(im) for i, im in enumerate(every_image)]
        video_names = [str(v) if isinstance(v, (str, Path)) else f"video {i}" for i, v in enumerate(every_video)]
        loaded = [([im if isinstance(im, Image.Image) else load_image(im) for im in images], q,
                   [self.read_video(v) if isinstance(v, (str, Path)) else v for v in (videos[0] if videos else ())])
                  for images, q, *videos in requests]
        return questions(self.tokenizer, self.model.config, loaded, names, video_names)

    def use_frames(self, n: int) -> None:
        """Sample n frames from each video instead of the checkpoint's n_frames: a video model without temporal
        attention takes any number (its frames are laid one after another), one with it only its own."""
        cfg = self.model.config
        if getattr(cfg, "n_frames", None) is None:
            raise ValueError(f"--frames {n}: this model ({cfg.family}) takes no video")
        if cfg.temporal and n != cfg.n_frames:
            raise ValueError(f"--frames {n}: this model's video tower has temporal attention learnt for "
                             f"{cfg.n_frames} frames, so it takes {cfg.n_frames}")
        self.model.config = dataclasses.replace(cfg, n_frames=n)  # ConfigError (a ValueError) for a bad n
        self.tokenizer.n_frames = n  # the original's layout writes a placeholder per frame

    def read_video(self, path: str | Path) -> torch.Tensor:
        """A video file as the model sees it: [n_frames, 3, S, S] (minifastv.video)."""
        from .video import video_pixels

        if getattr(self.model.config, "n_frames", None) is None:
            raise ValueError(f"{path}: this model ({self.model.config.family}) takes no video")
        return video_pixels(path, self.model.config)

    def answer(self, images, question: str, *, videos: Sequence = (), prune: Pruner | None = None,
               max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None, on_text: Callable[[str], None] | None = None) -> Answer:
        """Greedy (or sampled) answer. on_text(piece) gets the answer as it is produced; the pieces join to
        exactly the decoded answer (subwords and multi-byte characters included)."""
        batch = self.inputs(images, question, videos)
        run = stream(self.model, **batch.model_inputs(), max_new_tokens=max_new_tokens, prune=prune,
                     temperature=temperature, top_p=top_p, eos_token_id=self.model.config.text.eos_token_id,
                     generator=generator)
        return self.collect(run, on_text, prompt_ids(batch, 0))

    def answer_batch(self, requests, *, prune: Pruner | None = None, max_new_tokens: int = 64,
                     temperature: float = 0.0, top_p: float = 1.0,
                     generator: torch.Generator | None = None) -> list[Answer]:
        """Answers to (images, question) or (images, question, videos) requests run as one left-padded batch; each
        with the model's report of its own sample (kept visual tokens, FLOPs), the batch's prefill time, and its
        own decode: the steps
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
                                     self.model, prompt_ids(batch, i)))
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
                         self.model, prompt)


def prompt_ids(batch: Batch, i: int) -> list[int]:
    """Sample i's prompt ids in `batch`, without its left padding."""
    return batch.input_ids[i][batch.attention_mask[i].bool()].tolist()


class Chat:
    """A conversation about one image (or one video) in LLaVA's vicuna_v1 multi-turn format. The first question
    encodes the image and prunes it (`prune`) once; later ones append "</s>USER: q ASSISTANT:" to the kept KV
    cache, so only their own tokens are computed. `reset()` starts over."""

    def __init__(self, pipe: Pipeline, image=None, *, video=None, prune: Pruner | None = None, **sampling):
        if (image is None) == (video is None):
            raise ValueError("a conversation is about one image or one video: give exactly one of them")
        self.pipe, self.prune, self.sampling = pipe, prune, sampling
        self.media = ([image], []) if video is None else ([], [video])
        self.reset()

    def reset(self):
        self.cache = self.position = None
        self.pending: list[int] = []  # generated tokens not yet in the cache: the last answer's end
        self.image_report: dict | None = None  # the first turn's visual tokens, kept slots and groups

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> Answer:
        tok, eos = self.pipe.tokenizer, self.pipe.model.config.text.eos_token_id
        visual, prompt = {}, ()
        if self.cache is None:
            batch = self.pipe.inputs(self.media[0], question, self.media[1])
            ids, pixels, prune, prompt = batch.input_ids, batch.pixel_values, self.prune, prompt_ids(batch, 0)
            visual = batch.visual_inputs()
        else:
            if not question.strip() or any(marker in question for marker in tok.markers):
                raise ValueError("a later question needs text, and no <image> or <video>: the conversation has its "
                                 "image or video")
            ids, pixels, prune = torch.tensor([self.pending + tok.encode_turn(question)]), None, None
        # An answer gets max_new_tokens (256 unless given) or what is left of the context, as the server clamps.
        context = self.pipe.model.config.text.max_seq_len
        held = 0 if self.position is None else int(self.position.max())
        room = context - held - self.pipe.model.merged_slots(ids)[1]
        if room < 1:
            raise ValueError(f"the conversation fills the model's context of {context} tokens")
        limit = min(self.sampling.get("max_new_tokens", 256), room)
        run = stream(self.pipe.model, ids, pixels, prune=prune, eos_token_id=eos, cache=self.cache,
                     position=self.position, **{**self.sampling, "max_new_tokens": limit}, **visual)
        answer = self.pipe.collect(run, on_text, prompt)
        if self.image_report is None:
            self.image_report = {key: getattr(answer, key) for key in ("n_image_tokens", "kept_image_slots", "groups")}
        else:  # a later turn's prefill sees no image; the cache holds the first turn's kept visual tokens
            answer = dataclasses.replace(answer, **self.image_report)
        self.cache, self.position = run.cache, run.position
        # The cache lacks the last token sampled: EOS, or the answer's last when the budget ran out (then an
        # EOS follows it): in training every answer ends with </s>.
        self.pending = [eos] if answer.ended else [answer.token_ids[-1], eos]
        return answer
