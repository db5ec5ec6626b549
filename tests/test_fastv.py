"""FastV against an independent reference built from transformers' own model: its eager attention matrix at
layer k-1 ranks the image tokens, its hidden states are gathered explicitly, and its own layers k.. rerun
on the kept tokens at their original positions, with no cache."""

import pytest
import torch
from helpers import IMAGE_TOKEN, assert_batch_equals_alone, expand_images, random_pixels, random_prompt

from minifastv import FastV, KVCache, generate, theoretical_flops
from minifastv.config import LlavaConfig, TextConfig
from minifastv.pruning import layer_flops

N_PATCHES = 16


@pytest.fixture(scope="module")
def pair(twin):
    return twin(n_kv_heads=2, rms_eps=1e-4, seed=5, text_layers=4)


@torch.no_grad()
def reference(hf, ids, pixels, k, ratio=None, keep=None, generated=()):
    """(kept slots, last-position logits). Ranks with transformers' eager attention unless `keep` is given;
    `generated` tokens are appended to the sequence and always kept, as FastV with a fixed keep set would."""
    expanded = torch.tensor([expand_images(ids, N_PATCHES) + list(generated)])
    out = hf(input_ids=expanded, pixel_values=pixels, output_hidden_states=True, output_attentions=True)
    T = expanded.shape[1]
    if keep is None:
        is_image = expanded[0] == IMAGE_TOKEN
        row = out.attentions[k - 1][0, :, -1, :].mean(0)                 # head-mean attention of the last token
        image_slots = is_image.nonzero()[:, 0]
        n_keep = round((1 - ratio) * len(image_slots))
        top = image_slots[row[image_slots].topk(n_keep).indices]
        keep = sorted((~is_image).nonzero()[:, 0].tolist() + top.tolist())
    else:
        keep = list(keep) + list(range(T - len(generated), T))
    lm = hf.model.language_model
    h = out.hidden_states[k][:, keep]                                    # input of layer k, gathered
    positions = torch.tensor([keep])                                     # original rotary positions
    causal = torch.full((len(keep), len(keep)), float("-inf")).triu(1)[None, None]
    cos_sin = lm.rotary_emb(h, positions)
    for layer in lm.layers[k:]:
        h = layer(h, attention_mask=causal, position_ids=positions, position_embeddings=cos_sin)
        h = h[0] if isinstance(h, tuple) else h
    return keep[:len(keep) - len(generated)], hf.lm_head(lm.norm(h))[:, -1]


@torch.no_grad()
@pytest.mark.parametrize("k, ratio", [(1, 0.5), (2, 0.25), (2, 0.5), (3, 0.75), (2, 0.9)])
@pytest.mark.parametrize("image_at", [[5], [2, 9]], ids=["one-image", "two-images"])
def test_matches_gather_and_rerun_reference(pair, k, ratio, image_at):
    hf, ours = pair
    ids = random_prompt(torch.Generator().manual_seed(k * 10 + len(image_at)), 14, image_at)
    pixels = random_pixels(len(image_at), seed=k)
    ref_keep, ref_logits = reference(hf, ids, pixels, k, ratio)
    pre = ours.prefill(torch.tensor([ids]), pixels, prune=FastV(k, ratio))
    assert pre.keep[0].tolist() == ref_keep
    n_image = len(image_at) * N_PATCHES
    assert len(pre.kept_image_slots()[0]) == round((1 - ratio) * n_image)
    assert pre.logits.shape[1] == len(ids) - len(image_at) + round((1 - ratio) * n_image)
    assert (pre.logits[:, -1] - ref_logits).abs().max() <= 1e-4


@torch.no_grad()
def test_pruning_changes_the_answer_logits(pair):
    """Guards the reference test against a model that ignores its images: pruning must matter."""
    _, ours = pair
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(1), 14, [5])])
    px = random_pixels(1)
    assert (ours(ids, px, prune=FastV(1, 0.75))[:, -1] - ours(ids, px)[:, -1]).abs().max() > 1e-2


@torch.no_grad()
def test_ratio_zero_and_deep_k_are_no_ops(pair):
    _, ours = pair
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(3), 12, [3, 7])])
    px = random_pixels(2)
    off = ours(ids, px)
    off_ids = generate(ours, ids, px, max_new_tokens=10)
    for fastv in (FastV(2, 0.0), FastV(4, 0.5), FastV(9, 0.5)):  # the model has 4 layers
        assert (ours(ids, px, prune=fastv) - off).abs().max() <= 1e-6
        assert generate(ours, ids, px, max_new_tokens=10, prune=fastv).tolist() == off_ids.tolist()


@torch.no_grad()
@pytest.mark.parametrize("k, ratio", [(1, 0.5), (2, 0.75)])
def test_cached_generation_equals_fixed_keep_set_recompute(pair, k, ratio):
    hf, ours = pair
    ids = random_prompt(torch.Generator().manual_seed(8), 10, [2, 6])
    pixels = random_pixels(2, seed=9)
    fastv = FastV(k, ratio)
    got = generate(ours, torch.tensor([ids]), pixels, max_new_tokens=10, prune=fastv)[0].tolist()
    keep = ours.prefill(torch.tensor([ids]), pixels, prune=fastv).keep[0].tolist()
    generated = []
    for _ in range(10):
        _, logits = reference(hf, ids, pixels, k, keep=keep, generated=generated)
        generated.append(int(logits.argmax()))
    assert got == generated


@torch.no_grad()
@pytest.mark.parametrize("image_ats", [([4], [1]), ([2, 6], [3])], ids=["one-image-each", "two-vs-one-image"])
def test_left_padded_batch_equals_singles(pair, image_ats):
    _, ours = pair
    g = torch.Generator().manual_seed(21)
    prompts = [random_prompt(g, 15, image_ats[0]), random_prompt(g, 6, image_ats[1])]
    pixels = [random_pixels(len(a), seed=30 + i) for i, a in enumerate(image_ats)]
    batch = assert_batch_equals_alone(ours, prompts, pixels, prune=FastV(2, 0.5))
    # Padding is never kept as an image token, and kept slots are valid, image slots of their own sample.
    for i, slots in enumerate(batch.kept_image_slots()):
        assert all(batch.image_mask[i, s] and batch.valid[i, s] for s in slots)


@torch.no_grad()
def test_cache_of_pruned_layers_holds_text_plus_kept(pair):
    _, ours = pair
    ids = random_prompt(torch.Generator().manual_seed(4), 12, [3, 8])
    n_text, n_image = len(ids) - 2, 2 * N_PATCHES
    fastv = FastV(2, 0.75)
    cache = KVCache(4, extra=5)
    ours.prefill(torch.tensor([ids]), random_pixels(2), prune=fastv, cache=cache)
    kept = round(0.25 * n_image)
    assert cache.lengths() == [n_text + n_image] * 2 + [n_text + kept] * 2
    full_cache = KVCache(4, extra=5)
    ours.prefill(torch.tensor([ids]), random_pixels(2), cache=full_cache)
    per_slot = 2 * 2 * 16 * 4  # k and v, 2 kv heads, head dim 16, fp32
    assert full_cache.nbytes() - cache.nbytes() == 2 * (n_image - kept) * per_slot


def test_flops_hand_computed():
    assert layer_flops(4, 2, 3) == 4 * 4 * 2 * 2 + 2 * 4 * 4 * 2 + 2 * 4 * 2 * 3 == 176
    cfg = TextConfig(vocab_size=10, dim=2, n_layers=3, n_heads=1, n_kv_heads=1, intermediate_size=3)
    # 4 tokens, 2 of them image tokens; K=1, R=0.5 keeps 1 image token, so layers 1 and 2 see 3 tokens.
    assert theoretical_flops(cfg, 4, 2, FastV(1, 0.5)) == (176 + 2 * layer_flops(3, 2, 3), 3 * 176)
    assert layer_flops(3, 2, 3) == 4 * 3 * 4 + 2 * 9 * 2 + 2 * 3 * 2 * 3 == 120
    assert theoretical_flops(cfg, 4, 2, None) == (528, 528)
    assert theoretical_flops(cfg, 4, 2, FastV(3, 0.5)) == (528, 528)  # k >= n_layers: nothing pruned


def test_flops_llava_13b_matches_paper():
    """LLaVA-1.5-13B, K=2, R=50%: the paper reports a ~45% FLOPs reduction."""
    text = LlavaConfig.from_name("llava-1.5-13b").text
    n = 35 + 576 + 5  # system prompt, image, a short question and " ASSISTANT:"
    pruned, full = theoretical_flops(text, n, 576, FastV(2, 0.5))
    assert round(1 - pruned / full, 4) == 0.4501


@pytest.mark.parametrize("args, message", [
    ((0, 0.5), "FastV k must be an integer >= 1"),
    ((-1, 0.5), "FastV k must be an integer >= 1"),
    ((2.0, 0.5), "FastV k must be an integer >= 1"),
    ((2, -0.1), r"FastV ratio must be a number in \[0, 1\)"),
    ((2, 1.0), r"FastV ratio must be a number in \[0, 1\)"),
    ((2, "half"), r"FastV ratio must be a number in \[0, 1\)"),
])
def test_invalid_fastv_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        FastV(*args)


def test_fastv_without_image_is_refused(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="FastV prunes image tokens, but the batch has no image"):
        ours(torch.tensor([[1, 5, 6, 7]]), prune=FastV(2, 0.5))
