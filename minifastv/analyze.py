"""Where the attention goes, layer by layer (the phenomenon behind FastV, the paper's Figures 1-2), and a
picture of the image patches FastV keeps."""

from __future__ import annotations

import math

import torch
from einops import rearrange
from PIL import Image, ImageDraw

from .llama import attention_mask, rope_cos_sin

SEGMENTS = ("system", "image", "instruction")


@torch.inference_mode()
def attention_shares(model, input_ids, pixel_values) -> list[dict[str, list[float]]]:
    """Per decoder layer, how the head-averaged attention of the instruction tokens splits over the system
    tokens (text before the first image), the image tokens and the instruction tokens (text after the last
    image). Returns, per layer, {"last": [3 shares] of the prompt's last token, "instruction": [3 shares]
    averaged over all instruction tokens}. One prompt, no padding."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"attention analysis takes one prompt, got a batch of {input_ids.shape[0]}")
    x, valid, image_mask = model.embed(input_ids, pixel_values)
    if not image_mask.any():
        raise ValueError("attention analysis needs an image in the prompt")
    cfg = model.config.text
    T = x.shape[1]
    slot = torch.arange(T)
    image_slots = slot[image_mask[0]]
    segment = torch.full((T,), 2)                                      # instruction
    segment[slot < image_slots.min()] = 0                              # system
    segment[image_mask[0]] = 1                                         # image
    queries = slot[slot > image_slots.max()]
    if len(queries) == 0:
        raise ValueError("attention analysis needs text after the last image")
    cos, sin = rope_cos_sin(slot[None], cfg.head_dim, cfg.rope_theta, x.dtype)
    causal = slot[None, :] <= queries[:, None]                         # Q, T
    out = []
    for layer in model.llm.layers:
        q, k, _ = layer.attn.project(layer.attn_norm(x), cos, sin)
        q = rearrange(q[0, :, queries].float(), "(hk g) q d -> hk g q d", hk=cfg.n_kv_heads)
        scores = torch.einsum("hgqd,hsd->hgqs", q, k[0].float()) / math.sqrt(cfg.head_dim)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1).mean(dim=(0, 1))   # Q, T
        shares = torch.zeros(len(queries), 3).index_add_(1, segment, probs)               # Q, 3
        out.append({"last": shares[-1].tolist(), "instruction": shares.mean(0).tolist()})
        x, _ = layer(x, cos, sin, valid, attention_mask(valid, T))
    return out


def kept_patches_picture(view: Image.Image, grid: int, kept: list[int], scale: int = 6) -> Image.Image:
    """The model's view of the image, enlarged, with dropped patches dimmed and kept ones outlined.
    `kept` are patch indices in row-major order."""
    big = view.resize((view.width * scale, view.height * scale), Image.Resampling.NEAREST)
    dim = Image.blend(big, Image.new("RGB", big.size, (0, 0, 0)), 0.7)
    cell = big.width / grid
    boxes = [(c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1) for r, c in (divmod(p, grid) for p in kept)]
    mask = Image.new("L", big.size, 0)
    pen = ImageDraw.Draw(mask)
    for box in boxes:
        pen.rectangle(box, fill=255)
    out = Image.composite(big, dim, mask)
    outline = ImageDraw.Draw(out)
    for box in boxes:
        outline.rectangle(box, outline=(255, 200, 0))
    return out
