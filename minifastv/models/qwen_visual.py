"""Qwen-VL's vision side (Bai et al., arXiv 2308.12966; the hub repository's visual.py): an OpenCLIP ViT-bigG-style
encoder and a one-layer cross-attention resampler that turns its 1,024 patch features into 256 decoder tokens.

Encoder (VisionConfig: 448 px, patch 14, width 1664, 48 blocks, 16 heads, MLP 8192, LayerNorm eps 1e-6, every
block used): patches through a bias-free convolution, plus a 16 x 16 table of learned positions resized (bicubic)
to the patch grid, `ln_pre`, then CLIP's pre-norm blocks with the exact GELU; no class token. Qwen's attention
computes q, k, v with one projection laid out head by head (q, k, v of head 0, then head 1, ...); the converter
splits it into q_proj, k_proj, v_proj, so the blocks here are clip.py's.

Resampler: 256 learned queries (after `ln_q`, plus a fixed 2D sin-cos embedding of a 16 x 16 grid) attend to the
patch features (`kv_proj` to the decoder's width without bias, `ln_kv`; the keys get the sin-cos embedding resized
to the patch grid, the values do not), in one multi-head attention of decoder width / 128 heads; then `ln_post` and
a square matrix `proj`. An image is a plain bicubic resize to 448 x 448, normalised with CLIP's mean and std.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import VisionConfig
from .clip import VisionBlock


def resized(table: torch.Tensor, n: int) -> torch.Tensor:
    """A square grid's table [g * g, C] resized (bicubic, in fp32) to n = G * G rows, as Qwen's get_abs_pos."""
    g, G = math.isqrt(table.shape[0]), math.isqrt(n)
    if g == G:
        return table
    grid = rearrange(table.float(), "(h w) c -> 1 c h w", h=g)
    grid = F.interpolate(grid, size=(G, G), mode="bicubic", align_corners=False)
    return rearrange(grid, "1 c h w -> (h w) c").to(table.dtype)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid * grid, dim] fixed 2D sin-cos positions (MAE's): the first half encodes the column, the second the
    row, each as sines then cosines of frequencies 1 / 10000^(i / (dim / 4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    halves = [torch.outer(pos.flatten(), omega) for pos in (cols, rows)]
    return torch.cat([torch.cat((h.sin(), h.cos()), 1) for h in halves], 1).float()


class QwenVisionBlock(VisionBlock):
    """CLIP's block with the exact GELU (OpenCLIP's) in place of quick GELU."""

    def forward(self, x, need_cls_row: bool = False):
        x = x + self.attn(self.norm1(x))[0]
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)))), None


class QwenVisionTower(nn.Module):
    """pixels [N, 3, S, S] -> patch features [N, grid^2, width], every block run."""

    def __init__(self, cfg: VisionConfig, n_positions: int = 256):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(n_positions, cfg.dim))   # resized to the grid
        self.pre_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(QwenVisionBlock(cfg) for _ in range(cfg.n_used_layers))

    def forward(self, pixels, cls_attention: bool = False):
        if cls_attention:
            raise ValueError("Qwen-VL's vision tower has no class token: the methods that rank by its attention "
                             "(fastervlm, visionzip) do not apply")
        x = rearrange(self.patch_embed(pixels.to(self.patch_embed.weight.dtype)), "n c h w -> n (h w) c")
        x = self.pre_norm(x + resized(self.position_embedding, x.shape[1]))
        for block in self.blocks:
            x = block(x)[0]
        return x, None


class Resampler(nn.Module):
    """Patch features [N, P, width] -> [N, n_queries, dim]: learned queries cross-attend to them, then post_norm and
    proj. dim is the decoder's width; heads of 128."""

    def __init__(self, width: int, dim: int, n_queries: int = 256, eps: float = 1e-6):
        super().__init__()
        self.n_heads = dim // 128
        self.query = nn.Parameter(torch.zeros(n_queries, dim))
        self.register_buffer("pos_embed", sincos_2d(dim, math.isqrt(n_queries)))   # checkpoints carry Qwen's own
        self.kv_proj = nn.Linear(width, dim, bias=False)
        self.q_norm, self.kv_norm = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)   # Qwen's ln_q, ln_kv
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.post_norm = nn.LayerNorm(dim, eps=eps)                                           # Qwen's ln_post
        self.proj = nn.Parameter(torch.zeros(dim, dim))   # applied as x @ proj

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.kv_norm(self.kv_proj(features))                                  # N, P, dim
        pos = self.pos_embed.to(x.dtype)
        q = (self.q_norm(self.query) + pos).expand(len(x), -1, -1)                 # N, Q, dim
        heads = lambda t: rearrange(t, "n t (h d) -> n h t d", h=self.n_heads)
        y = F.scaled_dot_product_attention(heads(self.q_proj(q)), heads(self.k_proj(x + resized(pos, x.shape[1]))),
                                           heads(self.v_proj(x)))
        y = self.o_proj(rearrange(y, "n h t d -> n t (h d)"))
        return self.post_norm(y) @ self.proj.to(y.dtype)
