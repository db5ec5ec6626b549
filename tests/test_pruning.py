"""The pruning seam: any method on it gets cached generation, batching, several stages and the FLOPs count,
and the model reports what it did. FastV's own guarantees are in test_fastv.py."""

from dataclasses import dataclass

import pytest
import torch
from helpers import assert_batch_equals_alone, hf_llava, random_pixels, random_prompt, to_minifastv

from minifastv import FastV, KVCache, RandomDrop, generate, theoretical_flops
from minifastv.pruning import METHODS, Pruner, Stage, make
from minifastv.pruning.flops import scheduled_tokens

N_PATCHES = 16


@pytest.fixture(scope="module")
def ours(twin):
    return twin(n_kv_heads=2, seed=7, text_layers=4)[1]


@dataclass(frozen=True)
class EvenImageTokens(Pruner):
    """A two-stage method written as a user would: keep the image tokens of even rank (a bool mask) before
    layer 1 and again before layer 3. It ignores the content, so a recompute keeps the same set."""

    def stages(self, n_layers):
        return [Stage(1, 0.5), Stage(3, 0.5)]

    def select(self, ctx):
        index = ctx.image_index()
        chosen = ctx.image_mask & (index % 2 == 0)
        # n_keep is round(n / 2) of n present tokens: the even ranks are exactly that many
        return chosen


def sample_inputs(seed=0):
    ids = random_prompt(torch.Generator().manual_seed(seed), 12, [2, 7])
    return torch.tensor([ids]), random_pixels(2, seed=seed)


@torch.no_grad()
def test_two_stage_method_report_and_flops(ours):
    ids, px = sample_inputs()
    pre = ours.prefill(ids, px, prune=EvenImageTokens())
    n = ids.shape[1] - 2 + 2 * N_PATCHES
    assert pre.n_prompt_tokens() == [n] and pre.n_image_tokens() == [2 * N_PATCHES]
    # 32 image tokens: 16 kept before layer 1, 8 before layer 3
    assert pre.layer_tokens[0].tolist() == [n, n - 16, n - 16, n - 24]
    assert pre.layer_tokens[0].tolist() == scheduled_tokens(EvenImageTokens(), 4, n, 2 * N_PATCHES)
    assert (pre.flops[0], pre.flops_unpruned[0]) == theoretical_flops(ours.config.text, n, 2 * N_PATCHES,
                                                                       EvenImageTokens())
    first = int(pre.image_mask[0].nonzero()[0])
    kept = pre.kept_image_slots()[0]
    assert len(kept) == 8
    # ranks 0, 2, 4, ... survive the first stage; of those, every other one the second: ranks 0, 4, 8, ...
    image_slots = pre.image_mask[0].nonzero()[:, 0].tolist()
    assert kept == image_slots[::4] and kept[0] == first


@torch.no_grad()
def test_two_stage_cached_generation_equals_recompute(ours):
    """The cache of each stage's layers holds that stage's slots: greedy tokens through the cache equal
    argmax of a full pruned prefill over prompt + generated tokens, step by step."""
    ids, px = sample_inputs(1)
    method = EvenImageTokens()
    got = generate(ours, ids, px, max_new_tokens=6, prune=method)[0].tolist()
    seq = ids[0].tolist()
    for token in got:
        assert int(ours(torch.tensor([seq]), px, prune=method)[0, -1].argmax()) == token
        seq.append(token)


@torch.no_grad()
@pytest.mark.parametrize("method", [EvenImageTokens(), RandomDrop(1, 0.5, seed=4), RandomDrop(0, 0.75, seed=1)],
                         ids=["two-stage", "random-k1", "random-before-decoder"])
def test_left_padded_batch_equals_samples_alone(ours, method):
    g = torch.Generator().manual_seed(3)
    prompts = [random_prompt(g, 14, [3, 9]), random_prompt(g, 5, [1])]
    assert_batch_equals_alone(ours, prompts, [random_pixels(2, seed=5), random_pixels(1, seed=6)], prune=method,
                              new_tokens=5)


@torch.no_grad()
def test_random_seed_decides_the_keep_set(ours):
    ids, px = sample_inputs(2)
    kept = {seed: ours.prefill(ids, px, prune=RandomDrop(2, 0.5, seed=seed)).kept_image_slots()[0]
            for seed in (0, 1)}
    assert kept[0] != kept[1]
    assert ours.prefill(ids, px, prune=RandomDrop(2, 0.5, seed=1)).kept_image_slots()[0] == kept[1]
    assert len(kept[0]) == len(kept[1]) == 16


@torch.no_grad()
def test_pruning_before_the_decoder_saves_every_layer(ours):
    ids, px = sample_inputs(3)
    pre = ours.prefill(ids, px, prune=RandomDrop(0, 0.75))
    n = pre.n_prompt_tokens()[0]
    assert pre.layer_tokens[0].tolist() == [n - 24] * 4
    assert pre.flops[0] == theoretical_flops(ours.config.text, n, 32, RandomDrop(0, 0.75))[0]


@torch.no_grad()
def test_reported_flops_follow_k_and_ratio(ours):
    """The count of the pass actually run, for K and R other than the paper's, equals the formula."""
    ids, px = sample_inputs(4)
    n = ids.shape[1] - 2 + 2 * N_PATCHES
    for k, ratio in ((1, 0.25), (3, 0.75), (2, 0.9)):
        pre = ours.prefill(ids, px, prune=FastV(k, ratio))
        dropped = 32 - round((1 - ratio) * 32)
        assert pre.layer_tokens[0].tolist() == [n] * k + [n - dropped] * (4 - k)
        assert (pre.flops[0], pre.flops_unpruned[0]) == theoretical_flops(ours.config.text, n, 32, FastV(k, ratio))
    off = ours.prefill(ids, px)
    assert off.flops == off.flops_unpruned and off.layer_tokens[0].tolist() == [n] * 4


@torch.no_grad()
def test_cache_lengths_follow_the_schedule(ours):
    ids, px = sample_inputs(5)
    cache = KVCache(4, extra=2)
    pre = ours.prefill(ids, px, prune=EvenImageTokens(), cache=cache)
    assert cache.lengths() == pre.layer_tokens[0].tolist()


class Broken(Pruner):
    def stages(self, n_layers):
        return [Stage(1, 0.5)]

    def select(self, ctx):
        return ctx.image_mask  # every image token, not n_keep of them


def test_a_method_that_breaks_the_contract_is_named(ours):
    ids, px = sample_inputs()
    with pytest.raises(ValueError, match="Broken.select must mark exactly n_keep image slots"):
        ours.prefill(ids, px, prune=Broken())


class AsksTheUnknown(FastV):
    vision_score = "saliency"   # not a score the vision side gives: it would read as zeros


def test_a_method_asking_for_an_unknown_vision_score_is_refused(ours):
    ids, px = sample_inputs()
    with pytest.raises(ValueError, match="AsksTheUnknown.vision_score must be None or one of cls_attention, "
                                         "relevance, got 'saliency'"):
        ours.prefill(ids, px, prune=AsksTheUnknown(1, 0.5))


def test_make_builds_each_method_and_refuses_foreign_settings():
    assert make("fastv", 0.75, k=3) == FastV(3, 0.75)
    assert make("random", 0.5, k=1, seed=9) == RandomDrop(1, 0.5, seed=9)
    assert set(METHODS) >= {"fastv", "random"}
    with pytest.raises(ValueError, match="'fastv' takes no seed"):
        make("fastv", 0.5, seed=1)
    with pytest.raises(ValueError, match="unknown pruning method 'nope'"):
        make("nope", 0.5)
    with pytest.raises(ValueError, match="RandomDrop ratio must be a number in"):
        RandomDrop(1, 1.5)


@dataclass(frozen=True)
class ClassTokenTopK(Pruner):
    """Before the decoder, keep the image tokens that the vision tower's class token attends to most at the
    feature layer (FasterVLM's criterion, written plainly)."""

    ratio: float = 0.5
    vision_score = "cls_attention"

    def stages(self, n_layers):
        return [Stage(0, 1 - self.ratio)]

    def select(self, ctx):
        return ctx.vision_scores


@torch.no_grad()
@pytest.mark.parametrize("feature_layer", [-2, -1])
def test_vision_tower_exposes_class_token_attention_to_methods(feature_layer):
    """The row the tower computes next to SDPA is transformers' eager CLIP attention of the class token in
    the block whose output is the feature layer, and a method before the decoder keeps its top patches."""
    hf = hf_llava(n_kv_heads=2, seed=11, feature_layer=feature_layer)
    ours = to_minifastv(hf)
    ids, px = sample_inputs(6)
    attentions = hf.model.vision_tower(px, output_attentions=True).attentions
    ref = attentions[feature_layer][:, :, 0, 1:].mean(1)                     # images, patches
    torch.testing.assert_close(ours.vision(px, True)[1], ref, atol=1e-6, rtol=0)
    pre = ours.prefill(ids, px, prune=ClassTokenTopK(0.75))
    image_slots = pre.image_mask[0].nonzero()[:, 0]                          # both images', in order
    assert pre.kept_image_slots()[0] == sorted(image_slots[ref.flatten().topk(8).indices].tolist())  # sample's budget
    assert pre.layer_tokens[0].tolist() == [pre.n_prompt_tokens()[0] - 24] * ours.config.text.n_layers
