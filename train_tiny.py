"""Train the "tiny" LLaVA from scratch (vision tower, projector, decoder) on the synthetic shapes task, with
--video the tiny Video-LLaVA on the synthetic video task (video_shapes.py), with --anyres the tiny LLaVA-NeXT
on small shapes on wide and tall canvases (anyres_shapes.py), or with --qwen the tiny Qwen-VL on the shapes task
(its own byte-level BPE vocabulary, made as Qwen's is: tiktoken ranks, Qwen's split pattern and special tokens).

Each training dialogue asks one question of every type about an image (a video) and includes a "describe the
image." ("describe the video.") turn at a random place, which ties words to image regions densely, as LLaVA's
detailed-description data does; with one question per image the model stays on the answer prior for the whole
default run.

    python train_tiny.py [--video | --anyres | --qwen | --clip-text MODEL] [--steps 1250] [--batch-size 32]
                         [--out results/tiny] [--seed 0] [--force]

The shipped models are what this wrote: minifastv/data/tiny and tiny_video with --threads 1, tiny_next with
--anyres --steps 3000 at 2 threads, tiny_qwen with --qwen --steps 3000 at 2 threads; the tiny model's CLIP text
tower (CDPruner's relevance) with --clip-text minifastv/data/tiny --steps 2000 --batch-size 64 at 2 threads. The
default output is a new directory, so that a run never replaces a model inside an installed package by accident.

Uses the same model code as inference and writes a minifastv checkpoint with minifastv.save.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

import anyres_shapes
import minifastv
import shapes
import video_shapes
from minifastv import LlavaConfig, LlavaModel, Tokenizer, chat_prompt
from minifastv.config_clip import ClipTextConfig
from minifastv.inputs import Batch, conversations
from minifastv.models import FAMILIES, LlavaNextConfig, QwenVLConfig, VideoLlavaConfig
from minifastv.models.clip_text import ClipText
from minifastv.pipeline import Pipeline
from minifastv.tiktoken_bpe import QWEN_PATTERN, byte_chars, qwen_special, tokenizer_from_ranks

SPECIALS = ["<unk>", "<s>", "</s>", "<image>"]  # ids 0..3: pad/unk, BOS, EOS, the image placeholder
VIDEO_SPECIALS = [*SPECIALS, "<video>"]      # id 4: the video placeholder
# task: its synthetic task (module) and the preset of the model trained on it
TASKS = {"image": (shapes, lambda: LlavaConfig.from_name("tiny")),
         "video": (video_shapes, lambda: VideoLlavaConfig.from_name("tiny-video")),
         "anyres": (anyres_shapes, lambda: LlavaNextConfig.from_name("tiny-next")),
         "qwen": (shapes, lambda: QwenVLConfig.from_name("tiny-qwen"))}
QWEN_RANKS = 512   # at most; the trainer stops at 407, where no pair repeats: every word of the task is one token


def qwen_ranks() -> dict[bytes, int]:
    """The tiny Qwen-VL's vocabulary as tiktoken ranks: byte-level BPE trained on the task's text over Qwen's split
    pattern (tokenizers' BPE trainer: the 256 bytes, then each merge in the order it was made)."""
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    texts = shapes.corpus() + [chat_prompt("x", template="qwen", system=QwenVLConfig.system)]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=QWEN_RANKS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    byte_of = {c: b for b, c in enumerate(byte_chars())}
    return {bytes(byte_of[c] for c in token): rank for token, rank in bpe.get_vocab().items()}


def build_qwen_tokenizer() -> Tokenizer:
    """The tiny Qwen-VL's tokenizer: its ranks with Qwen's special tokens after them, built as a converted
    Qwen-VL's is (tiktoken_bpe.py)."""
    ranks = qwen_ranks()
    special = qwen_special(len(ranks))
    return Tokenizer(tokenizer_from_ranks(ranks, QWEN_PATTERN, special), bos_token_id=special["<|endoftext|>"],
                     eos_token_id=special["<|im_end|>"], image_token_id=special["<imgpad>"], template="qwen")


def build_tokenizer(task: str = "image") -> Tokenizer:
    """A word-level tokenizer over the task's text: every answer is one token (the tiny Qwen-VL's: a BPE)."""
    if task == "qwen":
        return build_qwen_tokenizer()
    video = task == "video"
    tok = HFTokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = TASKS[task][0].corpus() + [chat_prompt("x")]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=VIDEO_SPECIALS if video else SPECIALS))
    text = LlavaConfig.from_name("tiny").text
    return Tokenizer(tok, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                     image_token_id=tok.token_to_id("<image>"),
                     video_token_id=tok.token_to_id("<video>") if video else None)


def build_model(tok: Tokenizer, seed: int, task: str = "image") -> LlavaModel:
    """The task's tiny preset at the tokenizer's vocabulary size, in the small normal init training starts from."""
    base = TASKS[task][1]()
    vocab = -(-tok.vocab_size // 8) * 8
    ids = {"video_token_id": tok.video_token_id} if task == "video" else {}
    text = dataclasses.replace(base.text, vocab_size=vocab)
    if task == "qwen":   # its special ids follow its ranks
        ids = {"image_start_id": tok.tok.token_to_id("<img>"), "image_end_id": tok.tok.token_to_id("</img>")}
        end_of_text = tok.tok.token_to_id("<|endoftext|>")
        text = dataclasses.replace(text, bos_token_id=end_of_text, pad_token_id=end_of_text,
                                   eos_token_id=tok.eos_token_id)
    config = dataclasses.replace(base, text=text, image_token_id=tok.image_token_id, **ids)
    torch.manual_seed(seed)
    model = FAMILIES[config.family][1](config)
    with torch.no_grad():  # small normal init everywhere; norms start at 1, biases at 0
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return model


def training_batch(pipe: Pipeline, indices) -> Batch:
    """Multi-turn dialogues as LLaVA trains: "<system> USER: <image>\\n q1 ASSISTANT: a1 </s> USER: q2 ASSISTANT:
    a2 </s> ...", so one image (video) serves several questions. The first turn is exactly the single-turn prompt
    the model is evaluated on. Labels are the answers and their EOS (inputs.encode_conversation)."""
    size, task = pipe.model.config.vision.image_size, task_of(pipe)
    dialogues = []
    for i in indices:
        seen, turns = TASKS[task][0].conversation("train", i)
        if task == "video":
            dialogues.append(([], turns, [video_shapes.video_frames(seen, size)]))
        else:
            dialogues.append(([seen.image() if task == "anyres" else shapes.draw(seen, size)], turns))
    return conversations(pipe.tokenizer, pipe.model.config, dialogues)


def task_of(pipe: Pipeline) -> str:
    """The task a tiny model is trained on, from its family."""
    return {"video-llava": "video", "llava-next": "anyres", "qwen-vl": "qwen"}.get(pipe.model.config.family, "image")


def batch_loss(pipe: Pipeline, batch: Batch) -> torch.Tensor:
    return pipe.model.loss(batch.input_ids, batch.pixel_values, batch.labels, attention_mask=batch.attention_mask,
                           **batch.visual_inputs())


def warmup_cosine(opt, steps: int, max_warmup: int):
    """The learning rate rises linearly over a tenth of the steps (at most max_warmup), then falls on a cosine."""
    warmup = max(1, min(max_warmup, steps // 10))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))


def train(steps: int, seed: int, batch_size: int = 32, lr: float = 2e-3, log_every: int = 50, eval_every: int = 0,
          log=lambda msg: print(msg, flush=True), task: str = "image") -> Pipeline:
    """Train from scratch on `task` (TASKS); every eval_every steps (0: never) also log held-out accuracy on 100
    examples."""
    torch.manual_seed(seed)
    tok = build_tokenizer(task)
    model = build_model(tok, seed, task)
    pipe = Pipeline(model, tok)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = warmup_cosine(opt, steps, max_warmup=200)
    start, recent = time.perf_counter(), []
    for step in range(steps):
        # Each step sees fresh examples: index streams are disjoint per seed.
        first = (seed * 10_000_000) + step * batch_size
        batch = training_batch(pipe, range(first, first + batch_size))
        opt.zero_grad(set_to_none=True)
        loss = batch_loss(pipe, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        recent.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            per_step = elapsed / (step + 1)
            log(f"step {step + 1}/{steps}  loss {sum(recent) / len(recent):.4f}  {per_step * 1e3:.0f} ms/step  "
                f"elapsed {elapsed:.0f}s  eta {per_step * (steps - step - 1):.0f}s")
            recent = []
        if eval_every and (step + 1) % eval_every == 0:
            model.eval()
            acc = TASKS[task][0].evaluate(pipe, 100)
            model.train()
            log(f"step {step + 1}  held-out accuracy " + "  ".join(f"{k} {v:.0%}" for k, v in acc.items()
                                                               if k not in ("flops", "kept")))
    model.eval()
    return pipe


# The tiny model's CLIP text tower (--clip-text): CLIP's shape, scaled to the task; relevance_sign +1, since it is
# trained on the very patch features CDPruner reads (config_clip.py).
TINY_CLIP_TEXT = ClipTextConfig(vocab_size=640, dim=64, n_layers=2, n_heads=4, intermediate_size=256,
                                n_positions=32, projection_dim=64, relevance_sign=1)
CLIP_VOCAB = 638   # merges up to this many ids; the start- and end-of-text ids come last, as CLIP's


def build_clip_tokenizer(corpus, vocab_size: int = CLIP_VOCAB) -> HFTokenizer:
    """A byte-level BPE in CLIP's layout, trained on `corpus`: text lower-cased and split into words, each word's
    last piece ending in </w>, every byte a token alone and ending a word, start and end of text added around
    every text with the end-of-text id the largest (where CLIP's text tower pools)."""
    tok = HFTokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    words = Regex(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(words, behavior="removed", invert=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(alphabet), end_of_word_suffix="</w>",
                                  initial_alphabet=alphabet)
    tok.train_from_iterator(corpus, trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(tok.to_str())["model"]["merges"]]
    vocab = list(dict.fromkeys(alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]))
    tok.model = models.BPE({t: i for i, t in enumerate(vocab)}, merges, unk_token="<|endoftext|>",
                           end_of_word_suffix="</w>", continuing_subword_prefix="")
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    start, end = tok.token_to_id("<|startoftext|>"), tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.RobertaProcessing(("<|endoftext|>", end), ("<|startoftext|>", start),
                                                      add_prefix_space=False, trim_offsets=False)
    return tok


def clip_pairs(indices, size: int) -> tuple[list, list[str]]:
    """(images, texts) for the text tower's contrastive training: per index a training image of the shapes task
    and a question of the task about one of its shapes (so the shape is there to be found), or that shape
    described ("red square row one column two")."""
    images, texts = [], []
    for i in indices:
        rng = shapes._rng("train", i)
        items = shapes.sample_items(rng)
        it = rng.choice(items)
        cell = shapes.cell_name(it)
        row = shapes.NUMBERS[it.row + 1]
        texts.append(rng.choice([f"what colour is the {it.shape} in {cell}?", f"which shape is in {cell}?",
                                 f"is there a shape in {cell}?", f"how many shapes are in row {row}?",
                                 f"{it.colour} {it.shape} {cell}"]))
        images.append(shapes.draw(items, size))
    return images, texts


def train_clip_text(pipe: Pipeline, steps: int, seed: int, batch_size: int = 64, lr: float = 2e-3,
                    log=lambda msg: print(msg, flush=True)) -> Pipeline:
    """Give the model of `pipe` a CLIP text tower (TINY_CLIP_TEXT) trained contrastively against its own, frozen
    vision tower, as CLIP is, at the patch level: an image matches a text by its best patches (a soft maximum
    over the patches of their cosine to the text), and each text must pick its image out of the batch and each
    image its text (InfoNCE both ways). The tower, its projection and the vision side's post-LayerNorm and
    projection learn; the rest of the model does not change."""
    from minifastv.inputs import image_pixels

    model = pipe.model
    torch.manual_seed(seed)
    clip_tok = build_clip_tokenizer(shapes.corpus() * 4)
    config = dataclasses.replace(model.config, clip_text=dataclasses.replace(
        TINY_CLIP_TEXT, vocab_size=clip_tok.get_vocab_size()))
    model.config, model.clip_text = config, ClipText(config)
    model.clip_text.tokenizers = (pipe.tokenizer, clip_tok)
    text = model.clip_text     # torch's default init: unit-normal token embeddings let texts differ from the start
    with torch.no_grad():
        text.position_embedding.normal_(0.0, 0.01)
    opt = torch.optim.AdamW(text.parameters(), lr=lr, weight_decay=0.01)
    schedule = warmup_cosine(opt, steps, max_warmup=100)
    start, recent = time.perf_counter(), []
    for step in range(steps):
        first = seed * 10_000_000 + step * batch_size
        images, texts = clip_pairs(range(first, first + batch_size), config.vision.image_size)
        with torch.no_grad():
            features = model.vision(image_pixels(config, images))[0]                      # B, n, C
        patches = F.normalize(text.visual_projection(text.post_norm(features)), dim=-1)
        ids = [clip_tok.encode(t).ids for t in texts]
        width = max(map(len, ids))
        ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
        words = F.normalize(text.encode_text(ids), dim=-1)                                  # B, P
        cosine = torch.einsum("inp,tp->tin", patches, words)                                # texts, images, patches
        match = 0.1 * torch.logsumexp(cosine / 0.1, dim=-1)                                 # a soft best patch
        logits, target = match / 0.05, torch.arange(batch_size)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        recent.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            log(f"step {step + 1}/{steps}  contrastive loss {sum(recent) / len(recent):.4f}  elapsed {elapsed:.0f}s")
            recent = []
    model.eval()
    return pipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--video", action="store_true", help="the tiny Video-LLaVA on the video task (video_shapes.py)")
    which.add_argument("--anyres", action="store_true", help="the tiny LLaVA-NeXT on small shapes on wide and tall "
                       "canvases (anyres_shapes.py)")
    which.add_argument("--qwen", action="store_true", help="the tiny Qwen-VL on the shapes task, with a BPE vocabulary")
    which.add_argument("--clip-text", metavar="MODEL", help="give the tiny model at MODEL (minifastv/data/tiny) a CLIP "
                       "text tower trained contrastively against its vision tower (CDPruner's relevance)")
    p.add_argument("--steps", type=int, default=1250)
    p.add_argument("--out", default="results/tiny", help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=250, help="log held-out accuracy every N steps (0: never)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if Path(args.out).exists() and not args.force:
        print(f"error: {args.out}: already exists (--force replaces it)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    task = "video" if args.video else "anyres" if args.anyres else "qwen" if args.qwen else "image"
    if args.clip_text:
        pipe = train_clip_text(Pipeline.load(args.clip_text, dtype="float32"), args.steps, args.seed,
                               args.batch_size, args.lr)
    else:
        pipe = train(args.steps, args.seed, args.batch_size, args.lr, eval_every=args.eval_every, task=task)
    minifastv.save(pipe.model, pipe.tokenizer, args.out, overwrite=args.force)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
