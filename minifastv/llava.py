"""The vision-language model: CLIP patch features -> projector -> spliced into the LLaMA input sequence.

Each image is marked in input_ids by ONE placeholder id (config.image_token_id); the model widens that slot
into the image's n_patches feature vectors, as the original LLaVA does with its -200 placeholder.
"""

from __future__ import annotations

from dataclasses import dataclass
from unittest import mock

import torch
from torch import nn

from .cache import KVCache
from .clip import VisionTower
from .config import LlavaConfig
from .fastv import FastV
from .llama import Llama
from .quant import replace_linears


def build_projector(cfg: LlavaConfig) -> nn.Sequential:
    v, t = cfg.vision.dim, cfg.text.dim
    if cfg.projector_type == "linear":
        return nn.Sequential(nn.Linear(v, t))
    return nn.Sequential(nn.Linear(v, t), nn.GELU(), nn.Linear(t, t))  # mlp2x_gelu, exact (erf) GELU


@dataclass
class Prefill:
    """What a full-sequence pass produces. Slot tensors index the merged (image-expanded) sequence."""

    logits: torch.Tensor            # [B, T_out, vocab] ([B, 1, vocab] with last_only)
    valid: torch.Tensor             # [B, T] merged sequence, False at padding
    image_mask: torch.Tensor        # [B, T] merged slots that hold image features
    keep: torch.Tensor | None       # [B, T_out] merged slot of each slot after FastV pruning; None without it
    kept_valid: torch.Tensor        # [B, T_out] False where the pruned sequence is padded
    next_position: torch.Tensor     # [B] rotary position of the first generated token

    def kept_image_slots(self) -> list[list[int]]:
        """Per sample, the merged-sequence slots of the image tokens that survived (all of them without FastV)."""
        if self.keep is None:
            return [row.nonzero()[:, 0].tolist() for row in self.image_mask]
        kept = self.keep.masked_fill(~self.kept_valid, 0)
        return [k[v & m.gather(0, k)].tolist() for k, v, m in zip(kept, self.kept_valid, self.image_mask)]


class LlavaModel(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        self.vision = VisionTower(config.vision)
        self.projector = build_projector(config)
        self.llm = Llama(config.text)
        if config.quant is not None:  # the same decoder, with quantized linears in place of nn.Linear
            replace_linears(self, config.quant)
        self.tokenizer = None  # set by minifastv.load

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype activations are computed in (the embedding table may be stored narrower)."""
        return self.llm.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.llm.norm.weight.device

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.embed_tokens(ids).to(self.dtype)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] preprocessed images -> [N, n_patches, text dim] decoder inputs."""
        size = self.config.vision.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(f"pixel_values must have shape [num_images, 3, {size}, {size}], "
                             f"got {list(pixel_values.shape)}")
        if not pixel_values.isfinite().all():
            raise ValueError("pixel_values contains NaN or infinite values")
        return self.projector(self.vision(pixel_values))

    def embed(self, input_ids, pixel_values=None, attention_mask=None):
        """Token embeddings with each image placeholder widened into its patch features.

        Returns x [B, T, C], valid [B, T] and image_mask [B, T], with T the longest merged sample; shorter
        samples (fewer images, or more padding) are left-padded so every sample's last slot is its last token.
        """
        cfg = self.config
        if input_ids.ndim != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a LongTensor [batch, seq], got {input_ids.dtype} {list(input_ids.shape)}")
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"input_ids is empty (shape {[B, T]}): a prompt needs at least one token")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {list(mask.shape)} differs from input_ids shape {list(input_ids.shape)}")
        if not mask.any(1).all():
            raise ValueError(f"sample {int((~mask.any(1)).nonzero()[0])} has no tokens (its attention_mask is all 0)")
        is_image = input_ids == cfg.image_token_id
        n_images = int(is_image.sum())
        n_given = 0 if pixel_values is None else pixel_values.shape[0]
        if n_images != n_given:
            raise ValueError(f"the prompt has {n_images} image placeholder(s) (id {cfg.image_token_id}) "
                             f"but {n_given} image(s) were given")
        if (is_image & ~mask).any():
            raise ValueError("an image placeholder lies under attention_mask == 0")
        bad = ~is_image & mask & ((input_ids < 0) | (input_ids >= cfg.text.vocab_size))
        if bad.any():
            raise ValueError(f"token id {int(input_ids[bad][0])} is outside the vocabulary [0, {cfg.text.vocab_size})")

        N = cfg.vision.n_patches
        span = torch.where(is_image, N, 1)                     # slots each input token occupies
        end = span.cumsum(1)                                   # B, T
        length = end[:, -1]
        T_out = int(length.max())
        start = end - span + (T_out - length)[:, None]         # right-aligned: extra padding goes left
        if T_out > cfg.text.max_seq_len:
            raise ValueError(f"the merged prompt has {T_out} tokens ({n_images} image(s) x {N} patches included), "
                             f"more than the context of {cfg.text.max_seq_len}")

        tokens = self.embed_tokens(input_ids.masked_fill(is_image | ~mask, 0))
        x = tokens.new_zeros(B, T_out, tokens.shape[-1])
        valid = torch.zeros(B, T_out, dtype=torch.bool, device=x.device)
        image_mask = torch.zeros_like(valid)
        rows = torch.arange(B, device=x.device)[:, None].expand(B, T)
        text = ~is_image
        x[rows[text], start[text]] = tokens[text]
        valid[rows[text], start[text]] = mask[text]
        if n_images:
            # Boolean indexing walks the batch row-major: sample 0's images first, as pixel_values is ordered.
            img_rows = rows[is_image][:, None]                                        # n, 1
            img_cols = start[is_image][:, None] + torch.arange(N, device=x.device)    # n, N
            x[img_rows, img_cols] = self.encode_images(pixel_values).to(x.dtype)
            valid[img_rows, img_cols] = True
            image_mask[img_rows, img_cols] = True
        return x, valid, image_mask

    def prefill(self, input_ids, pixel_values=None, *, attention_mask=None, fastv: FastV | None = None,
                cache: KVCache | None = None, last_only: bool = False) -> Prefill:
        """One pass over the whole prompt (filling `cache` if given), optionally pruned with FastV. Inputs are
        moved to the model's device."""
        input_ids, pixel_values, attention_mask = (None if t is None else t.to(self.device)
                                                   for t in (input_ids, pixel_values, attention_mask))
        x, valid, image_mask = self.embed(input_ids, pixel_values, attention_mask)
        if fastv is not None and not image_mask.any():
            raise ValueError("FastV prunes image tokens, but the batch has no image")
        positions = (valid.cumsum(1) - 1).clamp(min=0)         # padding does not advance the position
        h, keep, kept_valid = self.llm(x, positions, valid, cache, fastv, image_mask)
        if last_only:
            h = h[:, -1:]
        return Prefill(self.llm.lm_head(h), valid, image_mask, keep, kept_valid, next_position=valid.sum(1))

    def forward(self, input_ids, pixel_values=None, *, attention_mask=None, fastv: FastV | None = None):
        """logits [B, T_out, vocab]; T_out is the merged (and, with FastV, pruned) length."""
        return self.prefill(input_ids, pixel_values, attention_mask=attention_mask, fastv=fastv).logits

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per sample ([B] ids at rotary positions [B]) through the cached decoder -> logits [B, vocab]."""
        x = self.embed_tokens(tokens[:, None])
        valid = torch.ones_like(tokens, dtype=torch.bool)[:, None]
        h, _, _ = self.llm(x, positions[:, None], valid, cache)
        return self.llm.lm_head(h[:, -1])

    def generate(self, input_ids, pixel_values=None, **kwargs):
        """See minifastv.generate.generate."""
        from .generate import generate

        return generate(self, input_ids, pixel_values, **kwargs)


def empty_model(config: LlavaConfig) -> LlavaModel:
    """The model with meta tensors (no memory), for load_state_dict(..., assign=True) to fill.

    Random initialisation is skipped: on the meta device it does nothing useful, and torch's first meta
    normal_() (the embedding's init) costs about 0.8 s of one-time set-up, forty times a tiny model's load.
    """
    with torch.device("meta"), mock.patch.object(torch.nn.init, "normal_", lambda tensor, *args, **kwargs: tensor):
        return LlavaModel(config)
