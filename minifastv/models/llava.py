"""The vision-language model: CLIP patch features -> projector -> spliced into the LLaMA input sequence. Each
image is marked in input_ids by ONE placeholder id (config.image_token_id); the model widens that slot into the
image's n_patches feature vectors, as the original LLaVA does with -200. A family adds kinds (spans())."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LlavaConfig
from ..inputs import IGNORE, check_inputs, check_pixels
from ..pruning import Pruner, decoder_flops
from .cache import KVCache
from .clip import VisionTower
from .clip_text import ClipText, relevance
from .llama import Llama
from .projector import build_projector


@dataclass
class Prefill:
    """What a full-sequence pass produced and what it did; slot tensors index the merged (image-expanded) sequence."""

    logits: torch.Tensor            # [B, T_out, vocab] ([B, 1, vocab] with last_only)
    valid: torch.Tensor             # [B, T] merged sequence, False at padding
    image_mask: torch.Tensor        # [B, T] merged slots that hold image features
    keep: torch.Tensor | None       # [B, T_out] merged slot of each slot after pruning; None without it
    kept_valid: torch.Tensor        # [B, T_out] False where the pruned sequence is padded
    next_position: torch.Tensor     # [B] rotary position of the first generated token
    layer_tokens: torch.Tensor      # [B, n_layers] tokens each decoder layer ran on, per sample
    flops: list[int]                # per sample, theoretical decoder FLOPs of this pass (4nd^2 + 2n^2d + 2ndm a layer)
    flops_unpruned: list[int]       # per sample, the same without pruning
    attention: list[torch.Tensor] | None = None  # with attention_rows=Q: per layer, [B, Q, S] (see prefill)
    select_s: float = 0.0           # seconds spent choosing the kept image tokens

    def kept_image_slots(self) -> list[list[int]]:
        """Per sample, the merged-sequence slots of the image tokens that survived (all of them unpruned)."""
        if self.keep is None:
            return [row.nonzero()[:, 0].tolist() for row in self.image_mask]
        kept = self.keep.masked_fill(~self.kept_valid, 0)
        return [k[v & m.gather(0, k)].tolist() for k, v, m in zip(kept, self.kept_valid, self.image_mask)]

    def n_prompt_tokens(self) -> list[int]:
        """Per sample, the prompt's tokens with each image counted as its patches."""
        return self.valid.sum(1).tolist()

    def n_image_tokens(self) -> list[int]:
        return self.image_mask.sum(1).tolist()


class LlavaModel(nn.Module):
    cache_type = KVCache  # the cache a generation keeps keys and values in (models/cache_int8.py: set_kv_cache)

    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        self.vision = VisionTower(config.vision)
        self.projector = build_projector(config)
        self.llm = Llama(config.text)
        self.clip_text = None if config.clip_text is None else ClipText(config)   # CLIP's text tower (CDPruner)

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype activations are computed in (the embedding table may be stored narrower)."""
        return self.llm.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.llm.norm.weight.device

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.embed_tokens(ids).to(self.dtype)

    def encode_images(self, pixel_values: torch.Tensor, score: str | None = None, input_ids=None):
        """[N, 3, H, W] preprocessed images -> [N, n_patches, text dim] decoder inputs; with a score, (features, per
        patch [N, n_patches] the class token's attention or its relevance to its prompt's instruction in input_ids)."""
        check_pixels(self.config, pixel_values)
        features, row = self.vision(pixel_values, score == "cls_attention")
        row = relevance(self, features, input_ids, self.config.image_token_id) if score == "relevance" else row
        return (self.projector(features), row) if score else self.projector(features)

    def spans(self) -> dict[int, int]:
        """Placeholder id -> the slots it widens into: here an image's patches (a family adds its own kinds)."""
        return {self.config.image_token_id: self.config.vision.n_patches}

    def groups(self) -> dict[int, int]:
        """Placeholder id -> tokens per group of its span that pruning's per-image methods divide (the image)."""
        return self.spans()

    def visual_features(self, input_ids, pixel_values, score: str | None, **visual) -> list[tuple]:
        """Per kind of placeholder: (its id, features [n, span, C] in placeholder order, the score [n, span] a
        method asked for (Pruner.vision_score), else None)."""
        if any(value is not None for value in visual.values()):
            raise ValueError(f"this model ({self.config.family}) takes no {', '.join(visual)}")
        if pixel_values is None:
            return []
        features = self.encode_images(pixel_values, score, input_ids)
        return [(self.config.image_token_id, *(features if score else (features, None)))]

    def embed(self, input_ids, pixel_values=None, attention_mask=None, score: str | None = None, **visual):
        """Token embeddings with each placeholder widened into its features (`visual`: a family's other inputs):
        x [B, T, C], valid [B, T], image_mask [B, T] (every visual slot) and, with a score (encode_images), the
        vision side's score at each image slot [B, T] (0 elsewhere; else None). T is the longest merged sample;
        shorter ones are left-padded so every sample's last slot is its last token."""
        mask = check_inputs(self.config, input_ids, pixel_values, attention_mask)
        B, T = input_ids.shape
        is_visual = torch.isin(input_ids, torch.tensor(list(self.spans()), device=input_ids.device))
        start, T_out = self.merged_slots(input_ids)
        tokens = self.embed_tokens(input_ids.masked_fill(is_visual | ~mask, 0))
        x = tokens.new_zeros(B, T_out, tokens.shape[-1])
        valid = torch.zeros(B, T_out, dtype=torch.bool, device=x.device)
        image_mask = torch.zeros_like(valid)
        rows = torch.arange(B, device=x.device)[:, None].expand(B, T)
        text = ~is_visual
        x[rows[text], start[text]] = tokens[text]
        valid[rows[text], start[text]] = mask[text]
        vision_scores = x.new_zeros(B, T_out, dtype=torch.float32) if score else None
        for token_id, features, scores in self.visual_features(input_ids, pixel_values, score, **visual):
            # Boolean indexing walks the batch row-major: sample 0's placeholders first, as the inputs are ordered.
            here = input_ids == token_id
            slot_rows = rows[here][:, None]                                                        # n, 1
            slot_cols = start[here][:, None] + torch.arange(features.shape[1], device=x.device)   # n, span
            x[slot_rows, slot_cols] = features.to(x.dtype)
            valid[slot_rows, slot_cols] = image_mask[slot_rows, slot_cols] = True
            if scores is not None:
                vision_scores[slot_rows, slot_cols] = scores.float()
        return x, valid, image_mask, vision_scores

    def merged_slots(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Where each input token lands in the merged sequence: start [B, T] (a placeholder's first slot) and
        the merged length T_out, samples right-aligned (extra padding goes left)."""
        span = torch.ones_like(input_ids)                      # slots each input token occupies
        for token_id, n in self.spans().items():
            span = span.masked_fill(input_ids == token_id, n)
        end = span.cumsum(1)                                   # B, T
        length = end[:, -1]
        T_out = int(length.max())
        if T_out > self.config.text.max_seq_len:
            raise ValueError(f"the merged prompt has {T_out} tokens ({int((span > 1).sum())} image(s) or video(s) "
                             f"included), more than the context of {self.config.text.max_seq_len}")
        return end - span + (T_out - length)[:, None], T_out

    def loss(self, input_ids, pixel_values, labels, *, attention_mask=None, **visual) -> torch.Tensor:
        """Mean next-token cross-entropy over the tokens whose label is not IGNORE (-100): labels [B, T] are
        per input token (inputs.conversations makes them: answers only), placed here at their merged slots."""
        logits = self(input_ids, pixel_values, attention_mask=attention_mask, **visual)       # B, T_out, V
        start, _ = self.merged_slots(input_ids)
        targets = torch.full(logits.shape[:2], IGNORE, dtype=torch.long, device=logits.device)
        text = ~torch.isin(input_ids, torch.tensor(list(self.spans()), device=input_ids.device))
        targets[torch.arange(len(input_ids), device=logits.device)[:, None].expand_as(start)[text],
                start.to(logits.device)[text]] = labels.to(logits.device)[text]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(), ignore_index=IGNORE)

    def prefill(self, input_ids, pixel_values=None, *, attention_mask=None, prune: Pruner | None = None,
                cache: KVCache | None = None, last_only: bool = False, attention_rows: int = 0,
                start_position: torch.Tensor | None = None, **visual) -> Prefill:
        """One pass over the whole prompt (filling `cache` if given), optionally pruned by a pruning method
        (minifastv.pruning), on the model's device. attention_rows=Q also keeps, per decoder layer, the head-mean
        attention of the last Q slots over the slots that layer saw. A cache that holds a conversation is continued:
        the new tokens take positions from start_position [B] (the last pass's next_position) on. `visual`: a
        family's other visual inputs (Video-LLaVA's video_values)."""
        input_ids, pixel_values, attention_mask = (None if t is None else t.to(self.device)
                                                   for t in (input_ids, pixel_values, attention_mask))
        visual = {name: None if t is None else t.to(self.device) for name, t in visual.items()}
        x, valid, image_mask, vision_scores = self.embed(input_ids, pixel_values, attention_mask,
                                                         None if prune is None else prune.vision_score, **visual)
        if prune is not None and not image_mask.any():
            raise ValueError(f"{type(prune).__name__} prunes image tokens, but the batch has no image")
        start = 0 if start_position is None else start_position.to(valid.device)[:, None]        # B, 1
        positions = (valid.cumsum(1) - 1).clamp(min=0) + start     # padding does not advance the position
        sizes = {n for token_id, n in self.groups().items() if (input_ids == token_id).any()}
        seq = self.llm.sequence(x, positions, valid, cache, image=image_mask, vision_scores=vision_scores,
                                n_patches=sizes.pop() if len(sizes) == 1 else None)  # None: groups of two sizes
        out = self.llm(seq, cache, prune, attention_rows)
        h = out.hidden[:, -1] if last_only else out.hidden   # [B, C]: for a [B, 1, C] slice torch copies lm_head
        keep, kept_valid, layer_tokens = out.seq.slots, out.seq.valid, out.layer_tokens.T.cpu()
        text = self.config.text
        next_position = (valid.sum(1, keepdim=True) + start)[:, 0]
        return Prefill(self.llm.lm_head(h).view(len(h), -1, text.vocab_size), valid, image_mask, keep, kept_valid,
                       next_position=next_position, layer_tokens=layer_tokens, attention=out.attention,
                       select_s=out.select_s, flops=[decoder_flops(text, n) for n in layer_tokens.tolist()],
                       flops_unpruned=[decoder_flops(text, [int(n)] * text.n_layers) for n in valid.sum(1)])

    def forward(self, input_ids, pixel_values=None, *, attention_mask=None, prune: Pruner | None = None, **visual):
        """logits [B, T_out, vocab]; T_out is the merged (and, when pruned, shortened) length."""
        return self.prefill(input_ids, pixel_values, attention_mask=attention_mask, prune=prune, **visual).logits

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per sample ([B] ids at rotary positions [B]) through the cached decoder -> logits [B, vocab]."""
        x = self.embed_tokens(tokens[:, None])
        valid = torch.ones_like(tokens, dtype=torch.bool)[:, None]
        h = self.llm(self.llm.sequence(x, positions[:, None], valid, cache), cache).hidden
        return self.llm.lm_head(h[:, -1])
