"""minifastv against transformers' LlavaForConditionalGeneration on the same random weights, in fp32."""

import pytest
import torch
from helpers import IMAGE_TOKEN, assert_batch_equals_alone, expand_images, random_pixels, random_prompt

from minifastv import generate

N_PATCHES = 16

CONFIGS = {
    "mha": dict(n_kv_heads=4, rms_eps=1e-5),
    "gqa-eps1e-3-theta500": dict(n_kv_heads=2, rms_eps=1e-3, rope_theta=500.0, seed=1),
    "mqa-feature-layer-1": dict(n_kv_heads=1, rms_eps=1e-4, feature_layer=1, seed=2),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, twin):
    return twin(**CONFIGS[request.param])


def hf_logits(hf, ids, pixels):
    with torch.no_grad():
        return hf(input_ids=torch.tensor([expand_images(ids, N_PATCHES)]), pixel_values=pixels).logits


def test_vision_features_and_projector_match(pair):
    hf, ours = pair
    pixels = random_pixels(3, seed=5)
    layer = hf.config.vision_feature_layer
    with torch.no_grad():
        ref_feat = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[layer][:, 1:]
        ref_proj = hf.model.multi_modal_projector(ref_feat)
        feat, _ = ours.vision(pixels)
        proj = ours.projector(feat)
    assert feat.shape == ref_feat.shape == (3, N_PATCHES, 32)
    torch.testing.assert_close(feat, ref_feat, atol=1e-5, rtol=0)
    torch.testing.assert_close(proj, ref_proj, atol=1e-5, rtol=0)


@pytest.mark.parametrize("image_at", [[6], [0], [3, 9]], ids=["mid", "first", "two-images"])
def test_logits_match(pair, image_at):
    hf, ours = pair
    ids = random_prompt(torch.Generator().manual_seed(7), 14, image_at)
    pixels = random_pixels(len(image_at), seed=3)
    ref = hf_logits(hf, ids, pixels)
    with torch.no_grad():
        got = ours(torch.tensor([ids]), pixels)
    assert got.shape == ref.shape == (1, len(ids) + len(image_at) * (N_PATCHES - 1), 128)
    assert (got[:, -1] - ref[:, -1]).abs().max() <= 1e-4
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("image_at", [[5], [2, 8]], ids=["one-image", "two-images"])
def test_greedy_generate_matches_transformers(pair, image_at):
    hf, ours = pair
    ids = random_prompt(torch.Generator().manual_seed(11), 12, image_at)
    pixels = random_pixels(len(image_at), seed=4)
    expanded = torch.tensor([expand_images(ids, N_PATCHES)])
    with torch.no_grad():
        ref = hf.generate(input_ids=expanded, pixel_values=pixels, max_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[:, expanded.shape[1]:]
    got = generate(ours, torch.tensor([ids]), pixels, max_new_tokens=16)
    assert got.shape == (1, 16)
    assert got.tolist() == ref.tolist()


@pytest.mark.parametrize("image_ats", [([4], [1]), ([2, 6], [3])], ids=["one-image-each", "two-vs-one-image"])
def test_left_padded_batch_equals_singles(pair, image_ats):
    _, ours = pair
    g = torch.Generator().manual_seed(13)
    prompts = [random_prompt(g, 15, image_ats[0]), random_prompt(g, 7, image_ats[1])]
    assert_batch_equals_alone(ours, prompts, [random_pixels(len(a), seed=20 + i) for i, a in enumerate(image_ats)],
                              new_tokens=10)


def test_image_placeholder_count_must_match_images(pair):
    _, ours = pair
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(0), 5, [1, 3])])
    with pytest.raises(ValueError, match=r"2 image placeholder\(s\) \(id 127\) but 1 image\(s\)"):
        ours(ids, random_pixels(1))
    assert IMAGE_TOKEN == ours.config.image_token_id
