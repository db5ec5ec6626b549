"""Half-precision forward passes stay close to fp32.

Tolerances, on the last-position logits, relative to the fp32 logits' standard deviation s:
bf16 (8 mantissa bits) max |diff| <= 0.35 s, mean <= 0.1 s; fp16 (11 bits) max <= 0.05 s, mean <= 0.015 s;
the argmax agrees; and the mean error is at most twice what transformers' own model makes in the same dtype
on the same weights. These random weights are large on purpose (std 0.2), which makes rounding error grow
through the layers; trained checkpoints sit well inside these bounds.
"""

import copy

import pytest
import torch
from helpers import expand_images, random_pixels, random_prompt

from minifastv import FastV, generate

BOUNDS = {torch.bfloat16: (0.35, 0.1), torch.float16: (0.05, 0.015)}


@pytest.fixture(scope="module")
def pair(twin):
    return twin(n_kv_heads=2, rms_eps=1e-5, seed=4)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("seed", [0, 1])
def test_half_precision_close_to_fp32(pair, dtype, seed):
    hf, model = pair
    ids = random_prompt(torch.Generator().manual_seed(seed), 20, [5, 12])
    px = random_pixels(2, seed=2)
    ref = model(torch.tensor([ids]), px)[:, -1]
    got = copy.deepcopy(model).to(dtype)(torch.tensor([ids]), px)[:, -1]
    hf_half = copy.deepcopy(hf).to(dtype)(input_ids=torch.tensor([expand_images(ids, 16)]),
                                          pixel_values=px.to(dtype)).logits[:, -1].float()
    assert got.dtype == dtype and torch.isfinite(got).all()
    err, s = (got.float() - ref).abs(), ref.std()
    max_bound, mean_bound = BOUNDS[dtype]
    assert err.max() <= max_bound * s and err.mean() <= mean_bound * s
    assert err.mean() <= 2 * (hf_half - ref).abs().mean()
    assert got.float().argmax() == ref.argmax()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_generate_with_fastv_runs(pair, dtype):
    _, model = pair
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(3), 20, [5, 12])])
    half = copy.deepcopy(model).to(dtype)
    for fastv in (None, FastV(2, 0.5)):
        out = generate(half, ids, random_pixels(2), max_new_tokens=4, prune=fastv)
        assert out.shape == (1, 4) and out.dtype == torch.long


@torch.no_grad()
def test_cpu_attention_and_cache_are_fp32_for_half_models(pair):
    """One bf16 query against the cache ran ~9x slower than fp32 in torch's CPU attention kernel."""
    from minifastv import KVCache

    _, ours = pair
    half = copy.deepcopy(ours).to(torch.bfloat16)
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(2), 8, [3])])
    cache = KVCache(half.config.text.n_layers, extra=2)
    half.prefill(ids, random_pixels(1), cache=cache)
    assert cache[0].k.dtype == cache[0].v.dtype == torch.float32
