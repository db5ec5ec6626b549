"""FastV (arXiv 2403.06764): after layer K-1, keep only the image tokens that the last prompt token attends
to most, and run layers K.. on the shorter sequence.

Two pieces live here: ranking (one attention row, computed directly so the attention itself stays SDPA)
and selection (which slots survive, per sample). The decoder loop in llama.py applies them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange

from .config import TextConfig


@dataclass(frozen=True)
class FastV:
    """Prune after layer `k` (layers 0..k-1 see every token), dropping the fraction `ratio` of image tokens.

    rank="attention" is FastV; rank="random" keeps a random subset of the same size (seeded by `seed`), the
    baseline that shows whether the attention ranking matters.
    """

    k: int
    ratio: float
    rank: str = "attention"
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"FastV k must be an integer >= 1 (the ranking uses layer k-1's attention), got {self.k!r}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ValueError(f"FastV ratio must be a number in [0, 1) (the fraction of image tokens dropped), "
                             f"got {self.ratio!r}")
        if self.rank not in ("attention", "random"):
            raise ValueError(f"FastV rank must be 'attention' or 'random', got {self.rank!r}")

    def n_kept(self, n_image_tokens: int) -> int:
        return round((1 - self.ratio) * n_image_tokens)


def last_token_attention(q_last: torch.Tensor, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention probabilities of the last query over all keys, in fp32.

    q_last [B, H, D], k [B, H_kv, S, D] (rotary already applied), valid [B, S]. Returns [B, S].
    The last slot may attend to every earlier slot, so the causal mask reduces to the padding mask.
    Cost: one row, O(S) per head, instead of the S x S matrix that eager attention would build.
    """
    H_kv, D = k.shape[1], k.shape[-1]
    q = rearrange(q_last.float(), "b (hk g) d -> b hk g d", hk=H_kv)  # query head h uses kv head h // g
    scores = torch.einsum("bhgd,bhsd->bhgs", q, k.float()) / math.sqrt(D)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1).mean(dim=(1, 2))


def select_tokens(row: torch.Tensor, image_mask: torch.Tensor, valid: torch.Tensor, fastv: FastV):
    """Slots that survive pruning, per sample, in their original order.

    row [B, S]: ranking scores; image_mask [B, S]: image-token slots; valid [B, S]: False at padding.
    Keeps every valid non-image slot and the top fastv.n_kept(n_image) image slots of each sample.
    Samples may keep different counts (different image counts), so the result is left-padded again:
    returns keep [B, L] (slot indices into S) and kept_valid [B, L].
    """
    n_keep = torch.tensor([fastv.n_kept(n) for n in image_mask.sum(1).tolist()], device=row.device)
    keep_mask = valid & ~image_mask
    k_max = int(n_keep.max())
    if k_max > 0:
        if fastv.rank == "random":
            row = torch.rand(row.shape, generator=torch.Generator().manual_seed(fastv.seed)).to(row.device)
        scores = row.masked_fill(~image_mask, float("-inf"))
        top = scores.topk(k_max, dim=1).indices                                   # B, k_max
        chosen = torch.arange(k_max, device=row.device)[None, :] < n_keep[:, None]
        keep_mask = keep_mask | torch.zeros_like(keep_mask).scatter(1, top, chosen)
    # A stable sort of the 0/1 mask puts dropped slots first and kept slots last, both in slot order.
    L = int(keep_mask.sum(1).max())
    keep = torch.sort(keep_mask.to(torch.uint8), dim=1, stable=True).indices[:, -L:]
    return keep, keep_mask.gather(1, keep)


def layer_flops(n: int, d: int, m: int) -> int:
    """The paper's per-layer count for n tokens: projections 4nd^2, attention 2n^2d, MLP 2ndm."""
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def theoretical_flops(cfg: TextConfig, n_tokens: int, n_image_tokens: int, fastv: FastV | None) -> tuple[int, int]:
    """(FLOPs with FastV, FLOPs without) for a prefill of n_tokens of which n_image_tokens are image tokens."""
    d, m, L = cfg.dim, cfg.intermediate_size, cfg.n_layers
    full = L * layer_flops(n_tokens, d, m)
    if fastv is None or fastv.k >= L:
        return full, full
    n_hat = n_tokens - (n_image_tokens - fastv.n_kept(n_image_tokens))
    return fastv.k * layer_flops(n_tokens, d, m) + (L - fastv.k) * layer_flops(n_hat, d, m), full
