"""The projector: vision features -> the decoder's embedding width (LLaVA-1.5's mlp2x_gelu, or one linear)."""

from __future__ import annotations

from torch import nn

from ..config import LlavaConfig


def build_projector(cfg: LlavaConfig) -> nn.Sequential:
    v, t = cfg.vision.dim, cfg.text.dim
    if cfg.projector_type == "linear":
        return nn.Sequential(nn.Linear(v, t))
    return nn.Sequential(nn.Linear(v, t), nn.GELU(), nn.Linear(t, t))  # mlp2x_gelu, exact (erf) GELU
