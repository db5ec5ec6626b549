"""CLIP's text tower and the two projections into CLIP's joint space, an optional part of a checkpoint that the
relevance-ranking methods (CDPruner) read: models/clip_text.py builds it, `convert --clip-text` adds it."""

from __future__ import annotations

from dataclasses import dataclass

from .config_checks import ConfigError, _check_positive


@dataclass(frozen=True)
class ClipTextConfig:
    """CLIP's text transformer (openai/clip-vit-large-patch14-336's by default) and its projection width."""

    vocab_size: int = 49408
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    intermediate_size: int = 3072
    norm_eps: float = 1e-5
    n_positions: int = 77       # tokens per chunk: a longer instruction is cut into chunks of this many
    projection_dim: int = 768
    # None: a chunk's pooled token is where its largest id lies (the end-of-text id is the vocabulary's last, and
    # transformers pools so for the openai configs, whose eos_token_id is 2); else the first of this id.
    eos_token_id: int | None = None
    # The sign under which a patch's CLIP similarity to the instruction means relevance. The official CDPruner
    # negates it for openai's CLIP as LLaVA uses it (its penultimate-layer patches, an observed anti-correlation);
    # a tower trained on those very patch features (the tiny model's) keeps it: +1.
    relevance_sign: int = -1

    def __post_init__(self):
        _check_positive(self, "vocab_size", "dim", "n_layers", "n_heads", "intermediate_size", "n_positions",
                        "projection_dim")
        if self.dim % self.n_heads:
            raise ConfigError(f"clip_text: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.relevance_sign not in (-1, 1):
            raise ConfigError(f"clip_text: relevance_sign must be 1 or -1, got {self.relevance_sign!r}")
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < self.vocab_size:
            raise ConfigError(f"clip_text: eos_token_id {self.eos_token_id} is outside the vocabulary "
                              f"[0, {self.vocab_size})")
