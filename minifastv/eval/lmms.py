"""minifastv as an lmms-eval model: `lmms-eval --model minifastv --model_args pretrained=DIR,prune=fastv,...`.

Each process (lmms-eval splits the requests by rank under `accelerate launch`) holds its own replica, on
cuda:<local rank> where GPUs exist and on the CPU otherwise. Prompts are LLaVA-1.5's vicuna_v1 single turn with
the images (and a video model's videos: lmms-eval's video tasks give their paths) first, images are preprocessed
as the checkpoint's config says (pad to square by default), videos as Video-LLaVA samples them, and
generation runs in left-padded batches (minifastv.Pipeline). A request that cannot be run (no image, an
unreadable image, a prompt over the context) is logged with its task and document id, answered with "" (or,
scored, with an infinite loss), and the run goes on. What the model did (image tokens kept, prefill FLOPs relative
to unpruned, prefill and decode time) is summed per task and written to `stats=FILE` at the end.
"""

from __future__ import annotations

import json
import math
import time

import torch
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image, ImageFile
from tqdm import tqdm

from ..data import TINY_MODEL
from ..image import to_rgb, tokens_per_image
from ..machine import physical_cores, resolve_device, resolve_dtype, set_threads
from ..models.cache import KVCache
from ..options import describe
from ..pipeline import Answer, Chat, Pipeline
from ..quant import set_activations
from ..tokenizer import IMAGE_MARKER, VIDEO_MARKER
from .settings import DEFAULT_MAX_NEW_TOKENS, RequestError, Sampling, process_layout, pruner
from .stats import summarize, write_json


def visual(request) -> bool:
    """Whether an (images, question, videos) request has an image or a video (else it runs unpruned)."""
    return bool(request[0] or request[2])


class MiniFastV(lmms):
    """lmms-eval's model arguments: pretrained (a minifastv checkpoint directory; default the shipped tiny
    model), prune (a method of minifastv.METHODS) with prune_ratio (the fraction of image tokens dropped) or
    prune_kept (image tokens kept per image, as papers quote budgets: 64, 128, 192 of LLaVA-1.5's 576),
    prune_k, prune_seed; anyres (LLaVA-NeXT: newlines-kept, views-apart or both, as the command line's --anyres);
    dtype (auto, float32, float16, bfloat16), activations (float, or int8 for an int8
    checkpoint on a CPU: int8act.py), device (default cuda:<local rank> where CUDA is, else cpu), threads
    (default: the physical cores shared among this machine's processes), batch_size, seed (sampling),
    require_image (default true: a request without an image is an error), stats (a JSON file for what the
    model did, per task)."""

    is_simple = True

    def __init__(self, pretrained: str = str(TINY_MODEL), prune: str | None = None, prune_ratio: float | None = None,
                 prune_kept: int | None = None, prune_k: int | None = None, prune_seed: int | None = None,
                 anyres: str | None = None,
                 dtype: str = "auto", activations: str = "float", device: str | None = None,
                 threads: int | None = None, batch_size: int | str = 1, seed: int = 0, require_image: bool = True,
                 stats: str | None = None, max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"unknown minifastv model_args: {', '.join(sorted(unknown))}")
        rank, world, local_rank, local_world = process_layout()
        if world > 1:
            from accelerate import Accelerator

            self.accelerator = Accelerator()
            self._rank, self._world_size = rank, world
        if device is None:
            device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and world > 1:
            device = f"cuda:{local_rank}"
        self._device = resolve_device(device)
        if self._device.type == "cpu":
            set_threads(threads or max(1, physical_cores() // local_world))
        resolve_dtype(dtype, self._device)  # a bad name is an error before anything is read
        self.pipe = Pipeline.load(pretrained, dtype=dtype, device=self._device)
        set_activations(self.pipe.model, activations)
        config = self.pipe.model.config
        self.prune = pruner(prune, prune_ratio, prune_kept, prune_k, prune_seed, tokens_per_image(config),
                            anyres=anyres, sized=getattr(config, "placeholder_per_token", False))
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.generator = torch.Generator(self._device).manual_seed(int(seed))
        self.require_image, self.stats_path, self.pretrained = require_image, stats, pretrained
        self.records: dict[tuple, dict] = {}  # (task, doc id, request idx) -> what the model did

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lmms-eval passes --batch_size and --device next to --model_args; model_args win where both are set
        (its --batch_size always has a value, 1 by default)."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    # --- requests ---------------------------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        out = [""] * len(requests)
        ready = []  # (request index, (images, question, videos), sampling, merged prompt length)
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            sampling = Sampling.of(gen_kwargs)  # a task's bad settings end the run: every request would fail
            try:
                images, videos = self.visuals(doc_to_visual, task, split, doc_id)
                request = (images, self.question(context, images, videos), videos)
                length = self.prompt_length(request)
                self.room(length, sampling.max_new_tokens or 1)
            except RequestError as e:
                self.failed(req, e)
                continue
            ready.append((i, request, sampling, length))
        # Batches of one sampling setting, longest prompts first (less padding, an over-long batch fails early);
        # text-only requests (require_image=false) apart, as pruning has nothing to prune there.
        groups: dict[tuple[Sampling, bool], list] = {}
        for r in sorted(ready, key=lambda r: -r[3]):
            groups.setdefault((r[2], visual(r[1])), []).append(r)
        chunks = [g[s:s + self.batch_size] for g in groups.values() for s in range(0, len(g), self.batch_size)]
        for chunk in tqdm(chunks, disable=self.rank != 0, desc="minifastv generate_until"):
            sampling = chunk[0][2]
            room = min(self.room(r[3], 1) for r in chunk)
            max_new = min(sampling.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, room)
            prune = self.prune if visual(chunk[0][1]) else None
            answers = self.pipe.answer_batch([r[1] for r in chunk], prune=prune, max_new_tokens=max_new,
                                             temperature=sampling.temperature, top_p=sampling.top_p,
                                             generator=self.generator)
            for (i, *_), answer in zip(chunk, answers):
                out[i] = sampling.cut(answer.text)
                self.record(requests[i], answer, share=len(chunk))
        return out

    def loglikelihood(self, requests) -> list:
        """Per request, (the continuation's mean negative log-likelihood per token, whether greedy decoding
        would produce it). lmms-eval ranks options by the smallest value (argmin), and its LLaVA models return
        this loss; the continuation is scored as the assistant's answer ended by EOS, as LLaVA trains on
        answers. Pruning picks its tokens from the context alone (for FastV, by the last prompt token's
        attention), as when generating; the continuation then runs on the pruned cache."""
        from lmms_eval.api.instance import GenerationResult

        out = []
        for req in tqdm(requests, disable=self.rank != 0, desc="minifastv loglikelihood"):
            try:
                if len(req.args) != 6:  # acc_mutual_info's unconditional ("", choice) requests
                    raise RequestError("a request without a document (acc_mutual_info) is not supported")
                context, target, doc_to_visual, doc_id, task, split = req.args
                continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                images, videos = self.visuals(doc_to_visual, task, split, doc_id)
                ids = self.pipe.tokenizer.encode_text(str(continuation).strip()) + [self.pipe.tokenizer.eos_token_id]
                batch = self.pipe.questions([(images, self.question(context, images, videos), videos)])
                loss, greedy, answer = self.score(batch, ids)
                self.record(req, answer)
            except ValueError as e:  # RequestError, unknown words, ...
                self.failed(req, e)
                loss, greedy = math.inf, False
            # lmms-eval 0.7 turns any other non-text answer into its str(); a GenerationResult's .text goes through.
            out.append(GenerationResult(text=(loss, greedy)))
        return out

    @torch.inference_mode()
    def score(self, batch, ids: list[int]) -> tuple[float, bool, Answer]:
        """(mean negative log-likelihood of `ids` after the prompt, whether each is the argmax, the report)."""
        model = self.pipe.model
        self.room(model.merged_slots(batch.input_ids)[1], len(ids))
        cache = KVCache(model.config.text.n_layers, extra=len(ids))
        start = time.perf_counter()
        visual = batch.pixel_values is not None or batch.video_values is not None
        prune = self.prune if visual else None  # a text-only request has nothing to prune
        pre = model.prefill(**batch.model_inputs(), prune=prune, cache=cache, last_only=True)
        logits = [pre.logits[0, -1:]]
        middle = time.perf_counter()
        if len(ids) > 1:  # the continuation but its last token, through the (pruned) cache
            rest = model.prefill(torch.tensor([ids[:-1]]), cache=cache, start_position=pre.next_position)
            logits.append(rest.logits[0])
        logits = torch.cat(logits).float()                                  # len(ids), vocab
        target = torch.tensor(ids, device=logits.device)
        loss = float(torch.nn.functional.cross_entropy(logits, target))
        answer = Answer.of(self.pipe.tokenizer, pre, 0, ids, middle - start, time.perf_counter() - middle,
                           len(ids) - 1, True, model, batch.input_ids[0].tolist())
        return loss, bool((logits.argmax(-1) == target).all()), answer

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        """A conversation per request, in LLaVA's vicuna_v1 multi-turn format on a kept KV cache (minifastv.Chat):
        the first round's image is encoded and pruned once; each later round's text (from the task's
        doc_to_text, given the answers so far) is a new user turn. Later rounds keep the first round's image."""
        out = []
        for req in tqdm(requests, disable=self.rank != 0, desc="minifastv multi-round"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            sampling = Sampling.of(gen_kwargs)
            rounds = []
            try:
                images, videos = self.visuals(doc_to_visual, task, split, doc_id)
                if len(images) + len(videos) != 1:
                    raise RequestError("a multi-round conversation is about one image or one video, this one has "
                                       f"{len(images)} image(s) and {len(videos)} video(s)")
                chat = Chat(self.pipe, images[0] if images else None, video=videos[0] if videos else None,
                            prune=self.prune, max_new_tokens=sampling.max_new_tokens or 256,
                            temperature=sampling.temperature, top_p=sampling.top_p, generator=self.generator)
                question, info = self.question(context, images, videos), None
                while True:
                    answer = chat.ask(question)
                    if not rounds:  # the first round prunes; later ones only add their own tokens
                        self.record(req, answer)
                    rounds.append(sampling.cut(answer.text))
                    doc = self.task_dict[task][split][doc_id]
                    _, question, done, _, info = doc_to_text(doc, previous_output=rounds, round_idx=len(rounds),
                                                             previous_round_info=info)
                    if done:
                        break
            except (RequestError, ValueError) as e:
                self.failed(req, e)
            out.append(rounds)
        return out

    # --- one request's parts ------------------------------------------------------------------------------

    def visuals(self, doc_to_visual, task, split, doc_id) -> tuple[list[Image.Image], list[torch.Tensor]]:
        """The document's images, decoded to RGB, and videos (paths, as lmms-eval's video tasks give them, read as
        the model samples them); a RequestError for none (unless require_image=false) and for anything that is
        not a readable image or video."""
        # lmms-eval lets PIL decode truncated files (the missing rows come out grey); here they are errors, also
        # when the task's own code decodes them.
        strict, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            try:
                visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
            except Exception as e:  # the task's own code: a missing file, a bad encoding, a truncated image...
                raise RequestError(f"the task could not produce its image ({type(e).__name__}: {e})") from None
            visuals = [v for v in (visuals or []) if v is not None]
            if not visuals and self.require_image:
                raise RequestError("no image or video (pass require_image=false to answer text-only requests)")
            images, videos = [], []
            for n, v in enumerate(visuals):
                if isinstance(v, str):
                    try:
                        videos.append(self.pipe.read_video(v))
                    except ValueError as e:  # VideoError: the file and the problem; or a model without video
                        raise RequestError(f"visual {n}: {e}") from None
                    continue
                if not isinstance(v, Image.Image):
                    raise RequestError(f"visual {n} is a {type(v).__name__}, not an image or a video file")
                try:
                    v.load()
                    images.append(to_rgb(v))
                except (OSError, SyntaxError, ValueError) as e:
                    raise RequestError(f"visual {n} is not a readable image ({e})") from None
            return images, videos
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = strict

    @staticmethod
    def question(context: str, images, videos=()) -> str:
        """The task's text as the user's question. The images (then videos) go first, each on its own line, as
        LLaVA-1.5's lmms-eval model puts them; <image> and <video> markers in the text (lmms-eval's LLaVA tasks
        may write them) are taken out."""
        if not isinstance(context, str):
            raise RequestError(f"the context is a {type(context).__name__}, not text")
        for marker, given, kind in ((IMAGE_MARKER, images, "image"), (VIDEO_MARKER, videos, "video")):
            n = context.count(marker)
            if n and n != len(given):
                raise RequestError(f"the context has {n} {marker} marker(s) but {len(given)} {kind}(s)")
            context = context.replace(marker + "\n", "").replace(marker, "")
        return context.strip()

    def prompt_length(self, request) -> int:
        """Tokens of the prompt of an (images, question, videos) request with each image and video counted as its
        tokens; errors (unknown words, an empty question) are the request's."""
        try:
            return self.pipe.model.merged_slots(self.pipe.questions([request]).input_ids)[1]
        except ValueError as e:
            raise RequestError(str(e)) from None

    def room(self, length: int, needed: int) -> int:
        """Tokens the context leaves after a prompt of `length`; a RequestError when fewer than `needed`."""
        context = self.pipe.model.config.text.max_seq_len
        if length + needed > context:
            raise RequestError(f"the prompt ({length} tokens with images) + {needed} new token(s) exceeds the "
                               f"context of {context}")
        return context - length

    # --- what the model did ---------------------------------------------------------------------------------

    def record(self, req, answer: Answer, share: int = 1):
        """One request's report; a batch's times are shared equally among its requests. A copy that lmms-eval
        adds to even out the ranks has its original's key, so it is counted once."""
        self.records[(req.task_name, req.doc_id, req.idx)] = {
            "task": req.task_name, "doc_id": req.doc_id, "image_tokens": answer.n_image_tokens,
            "kept_image_tokens": answer.kept, "flops": answer.flops, "flops_unpruned": answer.flops_unpruned,
            "prefill_s": answer.prefill_s / share, "decode_s": answer.decode_s / share,
            "decode_steps": answer.decode_steps}

    def failed(self, req, error: Exception):
        logger.error(f"minifastv: task {req.task_name}, document {req.doc_id}: {error}")
        self.records[(req.task_name, req.doc_id, req.idx)] = {"task": req.task_name, "doc_id": req.doc_id,
                                                              "error": str(error)}

    def clean(self):
        """After the last request (lmms-eval calls it on every rank): gather the records on rank 0 and write
        the stats file there."""
        super().clean()
        records = list(self.records.values())
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        if self.rank != 0:
            return
        report = summarize(records, model=str(self.pretrained),
                           prune="none" if self.prune is None else describe(self.prune))
        for task, s in report["tasks"].items():
            logger.info(f"minifastv {task}: {json.dumps(s)}")
        if self.stats_path:
            write_json(self.stats_path, report)
