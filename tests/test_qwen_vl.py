"""Qwen-VL as a minifastv family (minifastv/models/qwen_vl.py), on a tiny random model: an image placeholder between
<img> and </img> widens into the resampler's tokens; the shared paths hold (cache = recompute, batch = alone,
FastV keeping all = unpruned, FastV = an explicit gather-and-rerun over the 16 resampled tokens); the config
round-trips and is checked; the methods that read a class token refuse."""

import dataclasses
import json

import pytest
import torch
from helpers import assert_batch_equals_alone, randomize

from minifastv import FastV, generate
from minifastv.checkpoint import config_from_dict
from minifastv.config import ConfigError
from minifastv.models import QwenVLConfig, QwenVLModel
from minifastv.models.cache import KVCache
from minifastv.models.qwen import ntk_alpha
from minifastv.models.qwen_vl import QWEN_VL_CHAT
from minifastv.pruning import make

CFG = QwenVLConfig.from_name("tiny-qwen")
IMG, START, END = CFG.image_token_id, CFG.image_start_id, CFG.image_end_id


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = QwenVLModel(CFG).eval()
    randomize(m, seed=1)
    return m


def prompt(seed: int, n_text: int, n_images: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    ids = [int(t) for t in torch.randint(8, CFG.text.vocab_size, (n_text,), generator=g)]
    for i in range(n_images):
        ids[2 + 3 * i:2 + 3 * i] = [START, IMG, END]
    return ids


def pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_the_placeholder_widens_into_the_resampled_tokens_between_the_tags(model):
    ids = torch.tensor([prompt(0, 10, 2)])
    pre = model.prefill(ids, pixels(2, 0))
    assert pre.logits.shape[1] == 10 + 6 + 2 * (16 - 1) and pre.n_image_tokens() == [32]
    slots = pre.image_mask[0].nonzero()[:, 0].tolist()
    assert slots == list(range(3, 19)) + list(range(21, 37))      # after <img> (slot 2), before </img>
    with torch.no_grad():
        x, *_ = model.embed(ids, pixels(2, 0))
        features = model.encode_images(pixels(2, 0))
    torch.testing.assert_close(x[0, 3:19], features[0]) and torch.testing.assert_close(x[0, 21:37], features[1])


@torch.no_grad()
def test_cached_generation_equals_recomputation(model):
    ids, px = torch.tensor([prompt(1, 12, 1)]), pixels(1, 1)
    new = generate(model, ids, px, max_new_tokens=6)
    full = torch.cat([ids, new], 1)
    logits = model(full, px)
    assert logits[0, -7:-1].argmax(-1).tolist() == new[0].tolist()


@torch.no_grad()
def test_past_the_context_a_decode_step_keeps_the_prefills_rotary_base():
    """With a 16-token context a 30-token prompt rotates with NTK alpha 3, as 31 tokens would: the decode step
    after it, from the cache, equals the last row of a prefill over the prompt and that token, and so does a next
    turn's prefill continuing the cache (a pass that chose its base from its own single token, alpha 1, would not),
    and so does a step from the cache of a method that renumbers positions (its layers' own rotary tables) but here
    drops nothing."""
    cfg = dataclasses.replace(CFG, context=16)
    m = QwenVLModel(cfg).eval()
    randomize(m, seed=2)
    ids, px = torch.tensor([prompt(6, 12, 1)]), pixels(1, 6)
    cache = KVCache(cfg.text.n_layers, extra=1)
    pre = m.prefill(ids, px, cache=cache)
    assert ntk_alpha(torch.tensor([30, 31]), 16).tolist() == [3, 3] and pre.logits.shape[1] == 30
    token = pre.logits[:, -1].argmax(-1)
    step = m.decode_step(token, pre.next_position, cache)
    torch.testing.assert_close(step, m.prefill(torch.cat([ids, token[:, None]], 1), px).logits[:, -1])
    cache = KVCache(cfg.text.n_layers, extra=1)
    m.prefill(ids, px, cache=cache)
    torch.testing.assert_close(m.prefill(token[:, None], cache=cache, start_position=pre.next_position).logits[:, -1],
                               step)
    cache = KVCache(cfg.text.n_layers, extra=1)
    m.prefill(ids, px, cache=cache, prune=make("pyramiddrop-official", 0.0))
    assert cache[3].shift is not None and cache[3].length == 30
    torch.testing.assert_close(m.decode_step(token, pre.next_position, cache), step)


@pytest.mark.parametrize("prune", [None, FastV(k=2, ratio=0.5)], ids=["unpruned", "fastv"])
def test_a_padded_batch_gives_each_sample_what_it_gives_alone(model, prune):
    texts = [prompt(2, 14, 1), prompt(3, 6, 2), prompt(4, 9, 0 if prune is None else 1)]
    assert_batch_equals_alone(model, texts, [pixels(1, 2), pixels(2, 3), None if prune is None else pixels(1, 4)],
                              prune=prune)


@torch.no_grad()
def test_fastv_keeping_all_is_unpruned_and_fastv_is_a_gather_and_rerun(model):
    ids, px = torch.tensor([prompt(5, 12, 1)]), pixels(1, 5)
    off = model.prefill(ids, px, attention_rows=1)
    torch.testing.assert_close(model.prefill(ids, px, prune=FastV(k=2, ratio=0.0)).logits[:, -1], off.logits[:, -1])
    pruned = model.prefill(ids, px, prune=FastV(k=2, ratio=0.75))
    # By hand: rank the 16 tokens by layer 1's last-row attention, keep 4, run layers 2.. on the kept slots.
    image = off.image_mask[0].nonzero()[:, 0]
    top = image[off.attention[1][0, -1, image].topk(4).indices].sort().values
    keep = torch.cat([(~off.image_mask[0]).nonzero()[:, 0], top]).sort().values
    assert pruned.kept_image_slots()[0] == top.tolist()
    x, valid, image_mask, _ = model.embed(ids, px)
    seq = model.llm.sequence(x, (valid.cumsum(1) - 1), valid, image=image_mask)
    for layer in model.llm.layers[:2]:
        seq = type(seq)(layer(seq), seq.positions, seq.cos, seq.sin, valid, image_mask, theta=seq.theta)
    kept = model.llm.sequence(seq.x[:, keep], seq.positions[:, keep], valid[:, keep])
    for layer in model.llm.layers[2:]:
        kept = type(kept)(layer(kept), kept.positions, kept.cos, kept.sin, kept.valid, theta=kept.theta)
    torch.testing.assert_close(pruned.logits[0, -1], model.llm.lm_head(model.llm.norm(kept.x))[0, -1],
                               atol=1e-5, rtol=1e-5)


def test_class_token_methods_refuse_and_others_run(model):
    ids, px = torch.tensor([prompt(6, 10, 1)]), pixels(1, 6)
    for name in ("fastervlm", "visionzip"):
        with pytest.raises(ValueError, match="no class token"):
            model.prefill(ids, px, prune=make(name, 0.5))
    for name in ("random", "uniform", "pool", "divprune", "dart", "pyramiddrop"):
        assert model.prefill(ids, px, prune=make(name, 0.5)).n_image_tokens() == [16]
    with pytest.raises(ValueError, match="CLIP's text tower, which does not fit Qwen-VL"):
        model.prefill(ids, px, prune=make("cdpruner", 0.5))


def test_the_config_round_trips_and_is_checked():
    for config in (CFG, QWEN_VL_CHAT):
        assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
        assert "projector_type" not in config.to_dict()           # LLaVA's field: the resampler is the projector
    assert config_from_dict({**CFG.to_dict(), "projector_type": "mlp2x_gelu"}) == CFG   # written before, still read
    with pytest.raises(ConfigError, match="projector_type 'linear' does not apply to Qwen-VL"):
        config_from_dict({**CFG.to_dict(), "projector_type": "linear"})
    assert QWEN_VL_CHAT.vision.n_patches == 1024 and QWEN_VL_CHAT.n_queries == 256
    assert QWEN_VL_CHAT.vision.n_used_layers == 48
    with pytest.raises(ConfigError, match="n_queries must be a positive integer and a square, got 15"):
        QwenVLConfig(n_queries=15)
    with pytest.raises(ConfigError, match="image_token_id 151859 must be a vocabulary id of its own"):
        QwenVLConfig(text=QWEN_VL_CHAT.text, image_token_id=151859, image_start_id=151859)
    with pytest.raises(ConfigError, match="multiple of 128"):
        QwenVLConfig(text=QWEN_VL_CHAT.text.__class__(dim=4000, n_heads=40, n_kv_heads=40))
