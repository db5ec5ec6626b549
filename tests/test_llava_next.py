"""LLaVA-NeXT against transformers' LlavaNextForConditionalGeneration on the same random weights, in fp32, the
minifastv twin made by the production converter: the packed image features, the logits of prompts with images
wide, tall, square and smaller than a tile, and a left-padded batch against each prompt alone."""

import pytest
import torch
from helpers import IMAGE_SIZE, IMAGE_TOKEN, PATCH, VOCAB, randomize, to_minifastv

from minifastv.anyres import n_tiles
from minifastv.config import ConfigError
from minifastv.convert import ConversionError, map_key
from minifastv.inputs import left_pad
from minifastv.models import LlavaNextConfig

S = IMAGE_SIZE
PINPOINTS = [[S, 2 * S], [2 * S, S], [2 * S, 2 * S], [3 * S, S], [S, 3 * S]]
# (height, width): wide, tall, square, smaller than a tile, very wide
SIZES = [(30, 50), (50, 30), (70, 70), (10, 8), (20, 120)]


def hf_llava_next(*, n_kv_heads=4, rope_theta=10000.0, seed=0, decoder="llama"):
    """A small random transformers LlavaNextForConditionalGeneration, its decoder LLaMA or Mistral (llava-v1.6's
    Mistral-7B-Instruct-v0.2: no sliding window, rope theta 1e6)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextForConditionalGeneration, MistralConfig
    from transformers import LlavaNextConfig as HFConfig

    text = {"llama": LlamaConfig, "mistral": MistralConfig}[decoder](
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, rms_norm_eps=1e-5, max_position_embeddings=1024, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, **({"sliding_window": None}
                                                                              if decoder == "mistral" else {}))
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=S, patch_size=PATCH)
    cfg = HFConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
                   image_grid_pinpoints=PINPOINTS)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation="eager")
    return randomize(model, seed).eval()


DECODERS = {"llama-mha": {}, "llama-gqa-theta500": {"n_kv_heads": 2, "rope_theta": 500.0, "seed": 1},
            "mistral-gqa-theta1e6": {"n_kv_heads": 2, "rope_theta": 1e6, "seed": 2, "decoder": "mistral"}}


@pytest.fixture(scope="module", params=list(DECODERS))
def pair(request):
    hf = hf_llava_next(**DECODERS[request.param])
    return hf, to_minifastv(hf)


def tiles_of(sizes, seed=0):
    """Random pixels for each image's base image and tiles, as many as its size needs."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1 + n_tiles(h, w, S, PINPOINTS), 3, S, S, generator=g) for h, w in sizes]


def prompt(model, sizes, n_text=6, seed=0):
    """BOS, random text, and each image as its n_image_tokens placeholders, as transformers' processor writes it."""
    g = torch.Generator().manual_seed(seed)
    ids = [1]
    for h, w in sizes:
        ids += torch.randint(4, VOCAB - 1, (n_text,), generator=g).tolist()
        ids += [IMAGE_TOKEN] * model.config.n_image_tokens(h, w)
    return ids + torch.randint(4, VOCAB - 1, (n_text,), generator=g).tolist()


def hf_pixels(tiles):
    """transformers' batched form: [n_images, most tiles, 3, S, S], zero-padded."""
    most = max(len(t) for t in tiles)
    return torch.stack([torch.cat([t, t.new_zeros(most - len(t), *t.shape[1:])]) for t in tiles])


def test_the_converter_reads_the_config_and_the_newline(pair):
    hf, ours = pair
    assert isinstance(ours.config, LlavaNextConfig) and ours.config.pinpoints == tuple(map(tuple, PINPOINTS))
    torch.testing.assert_close(ours.image_newline, hf.model.image_newline, rtol=0, atol=0)
    for key in ("image_newline", "model.image_newline"):   # llava-hf's 4.x name; the original's and 5.x's
        assert map_key(key, ours.config) == "image_newline"
    with pytest.raises(ConversionError, match="unknown tensor 'model.image_newline'"):   # only LLaVA-NeXT has one
        map_key("model.image_newline", LlavaNextConfig.__mro__[1]())


def test_packed_image_features_match(pair):
    hf, ours = pair
    tiles = tiles_of(SIZES)
    with torch.no_grad():
        theirs = hf.model.get_image_features(hf_pixels(tiles), torch.tensor(SIZES), vision_feature_layer=-2,
                                             vision_feature_select_strategy="default").pooler_output
        mine = ours.encode_anyres(torch.cat(tiles), torch.tensor(SIZES))
    assert [len(m) for m in mine] == [ours.config.n_image_tokens(h, w) for h, w in SIZES]
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes", [SIZES[:1], SIZES[1:2], SIZES[2:3], SIZES[3:4], SIZES[:2], SIZES[2:]],
                         ids=["wide", "tall", "square", "small", "wide+tall", "three"])
def test_logits_match(pair, sizes):
    hf, ours = pair
    tiles, ids = tiles_of(sizes, seed=len(sizes)), prompt(ours, sizes)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([ids]), pixel_values=hf_pixels(tiles),
                    image_sizes=torch.tensor(sizes)).logits
        mine = ours(torch.tensor([ids]), torch.cat(tiles), image_sizes=torch.tensor(sizes))
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


def test_a_left_padded_batch_matches_transformers_and_each_prompt_alone(pair):
    hf, ours = pair
    samples = [[SIZES[0]], [SIZES[3], SIZES[1]], [SIZES[2]]]
    tiles = [tiles_of(s, seed=i) for i, s in enumerate(samples)]
    rows = [prompt(ours, s, seed=i) for i, s in enumerate(samples)]
    ids, mask, _ = left_pad(rows, 0)
    every = [t for sample in tiles for t in sample]
    sizes = torch.tensor([size for s in samples for size in s])
    with torch.no_grad():
        batch = ours(ids, torch.cat(every), attention_mask=mask, image_sizes=sizes)
        theirs = hf(input_ids=ids, attention_mask=mask, pixel_values=hf_pixels(every), image_sizes=sizes).logits
        for i, (row, s) in enumerate(zip(rows, samples)):
            alone = ours(torch.tensor([row]), torch.cat(tiles[i]), image_sizes=torch.tensor(s))[0]
            torch.testing.assert_close(batch[i, -len(row):], alone, rtol=1e-4, atol=1e-4)
    valid = mask.bool()
    torch.testing.assert_close(batch[valid], theirs[valid], rtol=1e-4, atol=1e-4)


def test_images_at_the_ends_of_rows_stay_apart(pair):
    """Row 0 ends with an image's placeholders and row 1 starts with another's: two runs, not one."""
    _, ours = pair
    k = ours.config.n_image_tokens(*SIZES[3])
    rows = [[1, 5, 6, 7] + [IMAGE_TOKEN] * k, [IMAGE_TOKEN] * k + [5, 6, 7, 8]]
    tiles = tiles_of([SIZES[3], SIZES[3]])
    with torch.no_grad():
        batch = ours(torch.tensor(rows), torch.cat(tiles), image_sizes=torch.tensor([SIZES[3]] * 2))
        for i, row in enumerate(rows):
            alone = ours(torch.tensor([row]), tiles[i], image_sizes=torch.tensor([SIZES[3]]))[0]
            torch.testing.assert_close(batch[i], alone, rtol=1e-4, atol=1e-4)


def test_inputs_that_do_not_fit_are_named(pair):
    _, ours = pair
    tiles, ids = tiles_of(SIZES[:2]), prompt(ours, SIZES[:2])
    n = len(torch.cat(tiles))
    with pytest.raises(ValueError, match=rf"pixel_values has {n - 1} tiles, but image_sizes .* need {n} "):
        ours(torch.tensor([ids]), torch.cat(tiles)[:-1], image_sizes=torch.tensor(SIZES[:2]))
    first = ids.index(IMAGE_TOKEN)
    with pytest.raises(ValueError, match=r"runs of \[\d+, \d+\], but the images need"):   # one placeholder short
        ours(torch.tensor([ids[:first] + ids[first + 1:]]), torch.cat(tiles), image_sizes=torch.tensor(SIZES[:2]))
    with pytest.raises(ValueError, match=r"this model \(llava-next\) takes no video_values"):
        ours(torch.tensor([ids]), torch.cat(tiles), image_sizes=torch.tensor(SIZES[:2]), video_values=torch.zeros(1))
    for pixels, sizes in ((torch.cat(tiles), None), (None, torch.tensor(SIZES[:2])), (None, None)):
        with pytest.raises(ValueError, match="LLaVA-NeXT takes an image as its tiles in pixel_values with its size"):
            ours(torch.tensor([ids]), pixels, image_sizes=sizes)   # the last: placeholders and no image at all
    with pytest.raises(ConfigError, match="positive multiples of the image size 28"):
        LlavaNextConfig(vision=ours.config.vision, text=ours.config.text, pinpoints=((28, 50),))


def test_a_decoder_that_is_not_llama_shaped_is_refused():
    from minifastv.convert import config_from_hf, text_config_from_hf

    mistral = {"model_type": "mistral", "max_position_embeddings": 32768, "rope_theta": 1e6}
    assert text_config_from_hf({**mistral, "sliding_window": None}).rope_theta == 1e6
    with pytest.raises(ConversionError, match="sliding_window 4096 is not supported"):   # Mistral-7B v0.1's
        text_config_from_hf({**mistral, "sliding_window": 4096})
    with pytest.raises(ConversionError, match="text model_type 'qwen2' is not supported"):
        config_from_hf({"text_config": {"model_type": "qwen2"}})


@pytest.mark.parametrize("decoder", ["llama", "mistral"])
def test_the_original_layout_converts_to_the_same_model(tmp_path, decoder):
    """liuhaotian/llava-v1.6-*: LlavaLlamaForCausalLM (LlavaMistralForCausalLM) names, the tower embedded,
    image_aspect_ratio anyres with canvases listed (width, height), model.image_newline. Its canvases listed here
    as the transformers model's swapped, the converted model is that model."""
    import json

    from helpers import build_tokenizer
    from safetensors.torch import save_file
    from test_convert import renamed, text_fields, vision_fields

    from minifastv import load
    from minifastv.convert import convert

    hf = hf_llava_next(**DECODERS["mistral-gqa-theta1e6" if decoder == "mistral" else "llama-mha"])
    state = renamed(hf.state_dict(), [("model.language_model.", "model."),
                                      ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
                                      ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
                                      ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model.")])
    src = tmp_path / "src"
    src.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(src / "model.safetensors"))
    config = {"architectures": [f"Llava{decoder.capitalize()}ForCausalLM"],
              "model_type": "llava_mistral" if decoder == "mistral" else "llava", **text_fields(hf),
              "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "mm_hidden_size": hf.config.vision_config.hidden_size, "mm_vision_tower": "clip",
              "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
              "image_grid_pinpoints": [[w, h] for h, w in PINPOINTS], "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 0, "hidden_act": "silu"}
    (src / "config.json").write_text(json.dumps(config))
    build_tokenizer(src / "tokenizer.json")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps(vision_fields(hf) | {"hidden_act": "quick_gelu"}))
    ours = load(convert(src, tmp_path / "out", vision_tower=tmp_path / "clip", log=lambda _: None), dtype=None)
    assert ours.config.pinpoints == tuple(map(tuple, PINPOINTS)) and ours.config.image_token_id == -200
    assert ours.config.template == ("mistral_instruct" if decoder == "mistral" else "vicuna_v1")
    sizes = [SIZES[3], SIZES[0]]
    tiles, ids = tiles_of(sizes), prompt(ours, sizes)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([ids]), pixel_values=hf_pixels(tiles), image_sizes=torch.tensor(sizes))
        mine = ours(torch.tensor([[-200 if t == IMAGE_TOKEN else t for t in ids]]), torch.cat(tiles),
                    image_sizes=torch.tensor(sizes))
    torch.testing.assert_close(mine, theirs.logits, rtol=1e-4, atol=1e-4)
    config["mm_patch_merge_type"] = "flat"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="mm_patch_merge_type 'flat' with anyres is not supported"):
        convert(src, tmp_path / "flat", vision_tower=tmp_path / "clip", log=lambda _: None)


def test_conversion_quantizes_the_decoder_and_keeps_the_newline(tmp_path):
    from helpers import write_hf_checkpoint

    from minifastv import load
    from minifastv.config import QuantConfig
    from minifastv.convert import convert

    hf = hf_llava_next()
    out = convert(write_hf_checkpoint(hf, tmp_path / "src"), tmp_path / "int8", quant=QuantConfig("int8"),
                  log=lambda _: None)
    ours = load(out, dtype="float32")
    assert ours.config.quant == QuantConfig("int8") and isinstance(ours.config, LlavaNextConfig)
    torch.testing.assert_close(ours.image_newline, hf.model.image_newline, rtol=0, atol=0)
    sizes = [SIZES[0]]
    tiles, ids = tiles_of(sizes), prompt(ours, sizes)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([ids]), pixel_values=hf_pixels(tiles), image_sizes=torch.tensor(sizes))
        mine = ours(torch.tensor([ids]), torch.cat(tiles), image_sizes=torch.tensor(sizes))
    assert (mine.argmax(-1) == theirs.logits.argmax(-1)).float().mean() > 0.9   # int8 weights: close, not equal
