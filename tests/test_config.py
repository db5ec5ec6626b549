import json

import pytest

from minifastv.checkpoint import config_from_dict
from minifastv.config import PRESETS, ConfigError, LlavaConfig, TextConfig, VisionConfig


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = LlavaConfig.from_name(name)
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_each_family_names_its_own_presets():
    from minifastv.models import FAMILIES

    for family, (config_class, _) in FAMILIES.items():
        for name in config_class.presets:
            cfg = config_class.from_name(name)
            assert type(cfg) is config_class and cfg.family == family
            assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        with pytest.raises(ConfigError, match=f"unknown preset 'x'; presets: {', '.join(config_class.presets)}$"):
            config_class.from_name("x")
    assert len({id(c.presets) for c, _ in FAMILIES.values()}) == len(FAMILIES)


def test_llava_presets_have_the_published_shapes():
    v = LlavaConfig.from_name("llava-1.5-7b").vision
    assert (v.dim, v.n_layers, v.n_heads, v.intermediate_size, v.patch_size, v.image_size) == (1024, 24, 16, 4096, 14, 336)
    assert v.n_patches == 576 and v.n_used_layers == 23  # hidden state -2: the output of block 23 of 24
    for name, shape in {"llava-1.5-7b": (4096, 32, 32, 11008), "llava-1.5-13b": (5120, 40, 40, 13824)}.items():
        t = LlavaConfig.from_name(name).text
        assert (t.dim, t.n_layers, t.n_heads, t.intermediate_size) == shape
        assert (t.vocab_size, t.n_kv_heads, t.rope_theta, t.bos_token_id, t.eos_token_id) == (32000, t.n_heads, 1e4, 1, 2)


@pytest.mark.parametrize("build, message", [
    (lambda: LlavaConfig.from_name("llava-2"), "unknown preset 'llava-2'"),
    (lambda: TextConfig(dim=100, n_heads=3), "dim 100 is not divisible by n_heads 3"),
    (lambda: TextConfig(n_heads=32, n_kv_heads=5), "n_heads 32 is not a multiple of n_kv_heads 5"),
    (lambda: TextConfig(n_layers=0), r"TextConfig\.n_layers must be a positive integer, got 0"),
    (lambda: TextConfig(dim="4096"), r"TextConfig\.dim must be a positive integer, got '4096'"),
    (lambda: VisionConfig(image_size=330), "image_size 330 is not a multiple of patch_size 14"),
    (lambda: VisionConfig(feature_layer=-30), r"feature_layer -30 is outside \[-25, 24\]"),
    (lambda: LlavaConfig(projector_type="mlp3x"), "projector_type 'mlp3x' is not one of"),
    (lambda: LlavaConfig(image_token_id=2), "image_token_id 2 collides with a special token id"),
    (lambda: TextConfig(vocab_size=100, bos_token_id=100), r"bos_token_id 100 is outside the vocabulary \[0, 100\)"),
    (lambda: TextConfig(vocab_size=100, eos_token_id=100), r"eos_token_id 100 is outside the vocabulary \[0, 100\)"),
    (lambda: TextConfig(vocab_size=100, pad_token_id=100), r"pad_token_id 100 is outside the vocabulary \[0, 100\)"),
    (lambda: TextConfig(vocab_size=100, eos_token_id=-1), r"eos_token_id -1 is outside the vocabulary"),
    (lambda: config_from_dict({"vision": {"layers": 3}}), r"vision: unknown field\(s\) \['layers'\]"),
    (lambda: config_from_dict({"text": [1, 2]}), "text: expected an object, got list"),
])
def test_bad_configs(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_the_image_id_need_not_be_a_vocabulary_entry():
    """Unlike bos/eos/pad, the image placeholder is never looked up: the original LLaVA marks images with -200,
    llava-hf with 32000 inside its padded 32064-row table. The vocabulary size itself works as well as -200."""
    import torch

    from minifastv import load
    from minifastv.data import TINY_MODEL

    model = load(TINY_MODEL, dtype="float32")
    vocab = model.config.text.vocab_size
    ids = torch.tensor([[1, 5, 6, model.config.image_token_id, 7, 8]])
    pixels = torch.zeros(1, 3, 64, 64)
    expected = model(ids, pixels)
    for image_id in (vocab, -200):
        model.config = LlavaConfig(vision=model.config.vision, text=model.config.text, image_token_id=image_id)
        torch.testing.assert_close(model(ids.masked_fill(ids == 3, image_id), pixels), expected, rtol=0, atol=0)
