"""CLIP ViT vision tower, as LLaVA uses it: patch features from an intermediate layer, class token dropped."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import VisionConfig


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class VisionAttention(nn.Module):
    causal = False  # CLIP's text tower (clip_text.py) sets it: a token attends to those before it

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, need_cls_row: bool = False):
        """Also returns, if asked, the class token's head-mean attention over the patches [N, n_patches] (one
        row, computed next to SDPA), else None."""
        q, k, v = (rearrange(proj(x), "b t (h d) -> b h t d", h=self.n_heads)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # images: every patch sees every patch
        row = None
        if need_cls_row:
            scores = torch.einsum("bhd,bhsd->bhs", q[:, :, 0].float(), k.float()) / math.sqrt(q.shape[-1])
            row = scores.softmax(-1).mean(1)[:, 1:]  # heads averaged; the class token's own share is dropped
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)")), row


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.dim)

    def forward(self, x, need_cls_row: bool = False):
        h, row = self.attn(self.norm1(x), need_cls_row)
        x = x + h
        return x + self.fc2(quick_gelu(self.fc1(self.norm2(x)))), row


class VisionTower(nn.Module):
    """pixels [N, 3, H, W] -> patch features [N, n_patches, dim] at cfg.feature_layer. Only the blocks up to the
    feature layer exist: LLaVA never uses the rest (nor CLIP's post-LayerNorm, but CDPruner: clip_text.py)."""

    def __init__(self, cfg: VisionConfig, keep_class_token: bool = False):
        super().__init__()
        self.cfg, self.keep_class_token = cfg, keep_class_token  # Video-LLaVA's frames keep it
        self.patch_embed = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.dim))
        self.position_embedding = nn.Parameter(torch.zeros(cfg.n_patches + 1, cfg.dim))
        self.pre_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.n_used_layers))

    def forward(self, pixels, cls_attention: bool = False):
        """Patch features [N, n_patches, dim]; with cls_attention, also the class token's head-mean attention
        over the patches in the block whose output is the feature layer [N, n_patches] (else None)."""
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))        # N, C, H/p, W/p
        x = rearrange(x, "n c h w -> n (h w) c")                              # row-major patch order
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.pre_norm(torch.cat([cls, x], dim=1) + self.position_embedding)   # N, 1 + n_patches, C
        for i, block in enumerate(self.blocks):
            x, row = block(x, cls_attention and i == len(self.blocks) - 1)
        return (x if self.keep_class_token else x[:, 1:]), row                 # LLaVA drops the class token
