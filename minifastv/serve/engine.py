"""The server's engine: one thread owns the model and runs one forward pass at a time.

Requests wait in a bounded queue. Between two decode steps the engine takes the requests that arrived,
prefills them as left-padded batches (one per pruning setting, since a prefill prunes with one method), and
merges their KV caches into the running batch (continuous batching: a request joins at the next step, it
does not wait for the others to finish). Each step then decodes one token for every running request; a
request that is complete (EOS, a stop string, its token budget) or whose client went away leaves the batch
at once, freeing its row. When idle, the first request waits `batch_wait` seconds for company.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..inputs import left_pad
from ..models.cache import KVCache
from ..models.generate import sample
from ..pipeline import Answer
from ..pruning import Pruner
from ..tokenizer import TextStream
from .batching import concat, keep_rows
from .protocol import ApiError

GONE = ApiError(499, "cancelled: the client went away", None, "cancelled")  # nobody is left to read it


class QueueFull(Exception):
    """The queue holds as many waiting requests as it may."""


class ShuttingDown(Exception):
    """The server no longer accepts requests."""


@dataclass(eq=False)
class Job:
    """One chat completion: its prompt, its settings, and `send`, which hands events to the request's handler
    from the engine's thread: ("text", piece) as the answer grows, then ("done", Answer, finish_reason) or
    ("error", ApiError) with the status the request ends with."""

    ids: list[int]
    pixels: torch.Tensor | None          # [n_images, 3, S, S]
    prune: Pruner | None
    max_tokens: int
    send: Callable[[tuple], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    videos: torch.Tensor | None = None   # [n_videos, n_frames, 3, S, S] (a video model's)
    image_sizes: torch.Tensor | None = None  # [n_images, 2] (LLaVA-NeXT's; its pixels are the images' tiles)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # The engine's own state of the request:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0                         # characters of `text` sent so far
    report: Answer | None = None
    first_s: float = 0.0                  # when the first token was out
    stream: TextStream | None = None
    generator: torch.Generator | None = None

    def cancel(self):
        self.cancelled.set()


class Engine:
    def __init__(self, pipe, *, max_batch: int = 8, max_queue: int = 32, batch_wait: float = 0.01,
                 step_delay: float = 0.0):
        self.pipe, self.max_batch, self.max_queue, self.batch_wait = pipe, max_batch, max_queue, batch_wait
        self.step_delay = step_delay   # seconds slept per decode step: lets tests act while a request runs
        self.model, self.tok = pipe.model, pipe.tokenizer
        self.eos = self.model.config.text.eos_token_id
        self.waiting: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.accepting, self.closed, self.deadline = True, False, None
        # decode steps run, tokens they decoded (rows x steps), requests decoding, requests whose client went
        self.steps = self.decoded = self.running = self.cancelled = 0
        self.thread = threading.Thread(target=self.run, name="minifastv-engine", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def submit(self, job: Job):
        """Queue `job`; QueueFull once more than max_queue requests would wait beyond the batch's free rows."""
        with self.cond:
            if not self.accepting:
                raise ShuttingDown()
            self.forget_gone()
            if len(self.waiting) >= self.max_queue + max(0, self.max_batch - self.running):
                raise QueueFull()
            self.waiting.append(job)
            self.cond.notify()

    def forget_gone(self):
        """Drop the waiting requests whose client went away: they hold no place in the queue (caller holds cond)."""
        for job in [j for j in self.waiting if j.cancelled.is_set()]:
            self.waiting.remove(job)
            self.cancelled += 1
            job.send(("error", GONE))

    def n_waiting(self) -> int:
        with self.cond:
            self.forget_gone()
            return len(self.waiting)

    def drain(self, grace: float):
        """Stop accepting; requests still running after `grace` seconds end as if their budget ran out."""
        with self.cond:
            self.accepting, self.deadline = False, time.monotonic() + grace
            for job in self.waiting:
                job.send(("error", ApiError(503, "the server is shutting down", None, "shutting_down")))
            self.waiting.clear()
            self.cond.notify()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()

    # --- the engine's thread --------------------------------------------------------------------------------

    def run(self):
        running: Running | None = None
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self.waiting and running is None and not self.closed:
                        self.cond.wait()
                    if self.closed and running is None:
                        return
                if running is None and self.batch_wait > 0:
                    time.sleep(self.batch_wait)   # let requests sent together be prefilled together
                new = self.take(self.max_batch - (0 if running is None else len(running.jobs)))
                try:
                    for prune, group in groups(new):
                        joined = self.prefill(group, prune)
                        running = joined if running is None else running.merge(joined)
                    if running is not None:
                        running = self.step(running)
                    self.running = 0 if running is None else len(running.jobs)
                except Exception as e:  # never leave a client waiting: whatever failed, its requests hear of it
                    for job in dict.fromkeys(new + ([] if running is None else running.jobs)):
                        job.send(("error", ApiError(500, f"{type(e).__name__}: {e}", None, "generation_failed")))
                    running, self.running = None, 0

    def take(self, room: int) -> list[Job]:
        with self.cond:
            self.forget_gone()
            jobs = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            self.running += len(jobs)   # taken: counted as running from here, never in neither count
            return jobs

    def prefill(self, jobs: list[Job], prune: Pruner | None) -> Running | None:
        ids, mask, _ = left_pad([j.ids for j in jobs], self.model.config.text.pad_token_id)
        pixels = [j.pixels for j in jobs if j.pixels is not None]
        videos = [j.videos for j in jobs if j.videos is not None]
        sizes = [j.image_sizes for j in jobs if j.image_sizes is not None]
        cache = KVCache(self.model.config.text.n_layers, extra=max(j.max_tokens for j in jobs))
        start = time.perf_counter()
        pre = self.model.prefill(ids, torch.cat(pixels) if pixels else None, attention_mask=mask,
                                 prune=prune, cache=cache, last_only=True,
                                 **({"video_values": torch.cat(videos)} if videos else {}),
                                 **({"image_sizes": torch.cat(sizes)} if sizes else {}))
        now = time.perf_counter()
        for i, job in enumerate(jobs):
            job.report = Answer.of(self.tok, pre, i, [], now - start, 0.0, 0, True, self.model, job.ids)
            job.first_s, job.stream = now, self.tok.text_stream()
            job.generator = torch.Generator(self.model.device)
            job.generator.manual_seed(job.seed if job.seed is not None else int(torch.randint(2**62, ())))
        return self.advance(Running(jobs, cache, pre.next_position), pre.logits[:, -1])

    def step(self, running: Running) -> Running | None:
        if self.step_delay:
            time.sleep(self.step_delay)
        logits = self.model.decode_step(running.tokens, running.position, running.cache)
        running.position = running.position + 1   # generated tokens continue the original positions
        self.steps, self.decoded = self.steps + 1, self.decoded + len(running.jobs)
        return self.advance(running, logits)

    def advance(self, running: Running, logits: torch.Tensor) -> Running | None:
        """Sample each request's next token, hand it over, and drop the requests that are complete."""
        jobs = running.jobs
        if all(j.temperature == 0 for j in jobs):
            tokens = logits.argmax(-1)
        else:
            tokens = torch.cat([sample(logits[i:i + 1], j.temperature, j.top_p, j.generator)
                                for i, j in enumerate(jobs)])
        late = self.deadline is not None and time.monotonic() > self.deadline
        keep = [i for i, (job, token) in enumerate(zip(jobs, tokens.tolist())) if not self.deliver(job, token, late)]
        running.tokens = tokens
        return running.keep(keep)

    def deliver(self, job: Job, token: int, late: bool) -> bool:
        """Hand `token` to its request; True once the request is complete (or gone)."""
        if job.cancelled.is_set():
            self.cancelled += 1
            job.send(("error", GONE))  # ends a handler still waiting
            return True
        reason = None
        if token == self.eos and not job.ignore_eos:
            reason = "stop"
        else:
            job.tokens.append(token)
            job.text += job.stream.push(token)
            cut = min((i for i in (job.text.find(s) for s in job.stop) if i >= 0), default=-1)
            if cut >= 0:   # the answer ends before the stop string, and so do its tokens
                job.text, reason = job.text[:cut], "stop"
                while job.tokens and len(self.tok.decode(job.tokens[:-1])) >= cut:
                    job.tokens.pop()
            elif len(job.tokens) >= job.max_tokens or late:
                reason = "length"
        # Text that may be the start of a stop string waits until it is known not to be.
        held = 0 if reason else max((n for s in job.stop for n in range(1, len(s)) if job.text.endswith(s[:n])),
                                     default=0)
        if len(job.text) - held > job.sent:
            job.send(("text", job.text[job.sent:len(job.text) - held]))
            job.sent = len(job.text) - held
        if reason:
            decode_s = time.perf_counter() - job.first_s
            sampled = len(job.tokens) + (token == self.eos and not job.ignore_eos)
            job.report = dataclasses.replace(job.report, text=job.text, token_ids=list(job.tokens),
                                             decode_s=decode_s, decode_steps=sampled - 1, ended=reason == "stop")
            job.send(("done", job.report, reason))
        return reason is not None


@dataclass
class Running:
    """The requests being decoded together: their rows of one KV cache, next positions and last tokens."""

    jobs: list[Job]
    cache: KVCache
    position: torch.Tensor
    tokens: torch.Tensor | None = None

    def keep(self, rows: list[int]) -> Running | None:
        if not rows:
            return None
        if len(rows) < len(self.jobs):
            index = torch.tensor(rows, device=self.position.device)
            keep_rows(self.cache, index)
            self.jobs, self.position, self.tokens = [self.jobs[i] for i in rows], self.position[index], self.tokens[index]
        return self

    def merge(self, other: Running | None) -> Running:
        if other is None:
            return self
        extra = max(j.max_tokens - len(j.tokens) for j in self.jobs + other.jobs)
        return Running(self.jobs + other.jobs, concat([self.cache, other.cache], extra),
                       torch.cat([self.position, other.position]), torch.cat([self.tokens, other.tokens]))


def groups(jobs: list[Job]) -> list[tuple[Pruner | None, list[Job]]]:
    """(pruning, jobs) that can be prefilled together: the same pruning (a request without an image or a video
    is not pruned)."""
    by_setting: dict = {}
    for job in jobs:
        visual = job.pixels is not None or job.videos is not None
        by_setting.setdefault(job.prune if visual else None, []).append(job)
    return list(by_setting.items())
