"""CDPruner (pruning/cdpruner.py): its greedy DPP against a plain greedy that recomputes log-determinants, the whole
method against the official code's computation rewritten here from its llava_arch.py (relevance sign and min-max
over the request's images, kernel, the Cholesky loop, one count per image), and its theta option."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_pixels, random_prompt

from minifastv.pruning import CDPruner
from minifastv.pruning.cdpruner import dpp_greedy, dpp_kernel, normalised


def plain_greedy(kernel: torch.Tensor, k: int) -> list[int]:
    """The paper's greedy MAP: add the index whose inclusion gives the largest log det, recomputed each time."""
    picks = []
    for _ in range(k):
        rest = [j for j in range(len(kernel)) if j not in picks]
        logdets = [torch.logdet(kernel[picks + [j]][:, picks + [j]].double()) for j in rest]
        picks.append(rest[int(torch.stack(logdets).argmax())])
    return picks


@pytest.mark.parametrize("seed", range(4))
def test_the_incremental_greedy_is_the_plain_log_det_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    features, relevance = torch.randn(24, 16, generator=g), torch.rand(24, generator=g)
    kernel = dpp_kernel(features, normalised(relevance), None).double()
    assert dpp_greedy(kernel, 12) == plain_greedy(kernel, 12)


def test_more_picks_than_the_kernels_rank_stay_distinct_and_finite():
    features = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))       # rank 3
    picks = dpp_greedy(dpp_kernel(features, torch.ones(10), None), 8)
    assert len(set(picks)) == 8


def test_relevance_is_min_max_normalised_as_the_official_code_does():
    torch.testing.assert_close(normalised(torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)),
                               torch.tensor([1e-6, 1 + 1e-6, 3 + 1e-6], dtype=torch.float64) / 3, atol=0, rtol=1e-12)
    assert normalised(torch.full((5,), 0.3)).tolist() == [1.0] * 5       # the official code divides by zero


def official_selection(features, image_embeds, text_embeds, n):
    """The official encode_images (CDPruner's llava_arch.py) on a request's images: features [B, N, C] after the
    projector, image_embeds [B, N, P] (CLIP's projection of the patches), text_embeds [M, P] (the chunks) ->
    each image's n kept indices, sorted."""
    B, N, _ = features.shape
    unit = features / features.norm(dim=-1, keepdim=True)
    similarity = unit.float() @ unit.float().transpose(1, 2)
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (-(image_embeds @ text_embeds.t())).mean(-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros(n, B, N)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select = torch.empty(n, B, dtype=torch.long)
    rows = torch.arange(B)
    for i in range(n):
        j = di2s.argmax(-1)
        select[i] = j
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) / di2s[rows, j].sqrt()[:, None]
        cis[i] = eis
        di2s -= eis ** 2
        di2s[rows, j] = float("-inf")
    return select.t().sort().values


@torch.no_grad()
@pytest.mark.parametrize("n_images, ratio", [(1, 0.5), (1, 0.75), (2, 0.75), (2, 0.875)])
def test_cdpruner_keeps_what_the_official_code_keeps(twin, n_images, ratio):
    """The same weights and prompt: the official computation, fed the transformers-free pieces of this model (its
    projected features, CLIP's patch embeddings and the instruction's chunk embeddings), keeps the same tokens."""
    _, model = twin(n_kv_heads=2, seed=13, text_layers=4, clip=True)
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(5), 14, [2, 7][:n_images])])
    px = random_pixels(n_images, seed=5)
    pre = model.prefill(ids, px, prune=CDPruner(ratio=ratio))
    clip = model.clip_text
    features = model.vision(px)[0]
    chunks = clip.chunks(clip.instruction(ids[0].tolist()))
    n = round(16 * n_images * (1 - ratio)) // n_images
    picks = official_selection(model.projector(features), clip.visual_projection(clip.post_norm(features)),
                               clip.encode_text(chunks), n)
    image_slots = pre.image_mask[0].nonzero()[:, 0].view(n_images, 16)
    assert pre.kept_image_slots()[0] == sorted(image_slots.gather(1, picks).flatten().tolist())


@torch.no_grad()
def test_theta_zero_is_diversity_alone_and_theta_is_checked(twin):
    _, model = twin(n_kv_heads=2, seed=13, text_layers=4, clip=True)
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(6), 10, [3])])
    px = random_pixels(1, seed=6)
    kept = model.prefill(ids, px, prune=CDPruner(ratio=0.75, theta=0.0)).kept_image_slots()[0]
    unit = F.normalize(model.projector(model.vision(px)[0])[0], dim=-1)
    first = int((ids[0] == 127).nonzero()[0, 0])
    assert kept == sorted(first + j for j in dpp_greedy(unit @ unit.T, 4))
    relevance = normalised(-F.normalize(model.clip_text.visual_projection(model.clip_text.post_norm(
        model.vision(px)[0]))[0], dim=-1) @ model.clip_text.directions(ids)[0])
    for theta in (0.3, 0.8):                                             # theta / (2 (1 - theta)): 3/14, 2
        weight = torch.exp(theta / (2 * (1 - theta)) * relevance)
        got = model.prefill(ids, px, prune=CDPruner(ratio=0.5, theta=theta)).kept_image_slots()[0]
        assert got == sorted(first + j for j in dpp_greedy(weight[:, None] * (unit @ unit.T) * weight[None], 8))
    for bad in (1.0, -0.1, "0.5"):
        with pytest.raises(ValueError, match="CDPruner theta must be None"):
            CDPruner(ratio=0.5, theta=bad)
