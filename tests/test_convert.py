"""convert_weights.py on random checkpoints written in every on-disk layout, checked against transformers."""

import contextlib
import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import IMAGE_TOKEN, expand_images, hf_llava, random_pixels, random_prompt
from safetensors.torch import save_file

import minifastv
from minifastv import generate
from minifastv.checkpoint import CheckpointError
from minifastv.convert import ConversionError, convert

ROOT = Path(__file__).resolve().parent.parent
N_PATCHES = 16


def write_shards(state: dict, directory: Path, fmt: str, n_shards: int = 2):
    """Split a state dict into n_shards files plus the index transformers writes."""
    names = list(state)
    per = -(-len(names) // n_shards)
    ext, index = ("safetensors", "model.safetensors.index.json") if fmt == "safetensors" else \
                 ("bin", "pytorch_model.bin.index.json")
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i in range(n_shards):
        file = f"{stem}-{i + 1:05d}-of-{n_shards:05d}.{ext}"
        shard = {k: state[k].contiguous() for k in names[i * per:(i + 1) * per]}
        if fmt == "safetensors":
            save_file(shard, str(directory / file))
        else:
            torch.save(shard, directory / file)
        weight_map.update(dict.fromkeys(shard, file))
    (directory / index).write_text(json.dumps({"weight_map": weight_map}))


def renamed(state, renames):
    out = {}
    for k, v in state.items():
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def text_fields(hf):
    t = hf.config.text_config
    return dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
                max_position_embeddings=t.max_position_embeddings, rope_theta=t.rope_parameters["rope_theta"])


def vision_fields(hf):
    v = hf.config.vision_config
    return dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, image_size=v.image_size,
                num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                patch_size=v.patch_size)


def write_llava_hf(hf, d: Path):
    """llava-hf: sharded safetensors, language_model.model.* names, a sparse config.json."""
    state = renamed(hf.state_dict(), [("model.language_model.", "language_model.model."),
                                      ("lm_head.", "language_model.lm_head."),
                                      ("model.vision_tower.", "vision_tower.vision_model."),
                                      ("model.multi_modal_projector.", "multi_modal_projector.")])
    write_shards(state, d, "safetensors")
    config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "torch_dtype": "float32",
              "image_token_index": 127, "text_config": {"model_type": "llama", **text_fields(hf)},
              "vision_config": vision_fields(hf)}  # hidden_act, eps, feature layer etc. left to the defaults
    (d / "config.json").write_text(json.dumps(config))


def write_transformers5(hf, d: Path):
    """transformers >= 4.52 in-memory names (model.language_model.*, lm_head.weight), rope_parameters, dtype."""
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(hf.config.to_dict()))


def write_save_pretrained(hf, d: Path):
    hf.save_pretrained(d)


def original_state(hf, embed_tower: bool):
    state = renamed(hf.state_dict(), [("model.language_model.", "model."),
                                      ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
                                      ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
                                      ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model.")])
    if not embed_tower:
        state = {k: v for k, v in state.items() if not k.startswith("model.vision_tower.")}
    head_dim = hf.config.text_config.hidden_size // hf.config.text_config.num_attention_heads
    for i in range(hf.config.text_config.num_hidden_layers):  # the buffers old transformers saved
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(head_dim // 2)
    return state


def original_config(hf):
    return {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "torch_dtype": "float32",
            **text_fields(hf), "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
            "mm_vision_select_feature": "patch", "mm_hidden_size": hf.config.vision_config.hidden_size,
            "mm_vision_tower": "openai/clip-vit-large-patch14-336", "image_aspect_ratio": "pad",
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu"}


def write_clip(hf, d: Path, kind: str):
    """A separate CLIP checkpoint: a whole CLIPModel (text tower included, as openai's repos ship it), a
    CLIPVisionModel as older transformers pickled it (vision_model.* names), or as 5.x saves it (bare names)."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    vision_cfg, tower = hf.config.vision_config, hf.model.vision_tower.state_dict()
    if kind == "clip-model":
        text = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision_cfg.to_dict(), projection_dim=8))
        clip.vision_model.load_state_dict(tower)
        clip.save_pretrained(d)
    elif kind == "vision-bin":
        torch.save({f"vision_model.{k}": v for k, v in tower.items()}, d / "pytorch_model.bin")
        (d / "config.json").write_text(json.dumps(vision_cfg.to_dict()))
    else:
        clip = CLIPVisionModel(vision_cfg)
        clip.load_state_dict(tower)
        clip.save_pretrained(d)


def write_original(hf, d: Path, tower: Path | None):
    write_shards(original_state(hf, embed_tower=tower is None), d, "bin")
    (d / "config.json").write_text(json.dumps(original_config(hf)))


@pytest.fixture(scope="module")
def hf_models():
    return {"mha": hf_llava(n_kv_heads=4, rms_eps=1e-5, seed=11), "gqa": hf_llava(n_kv_heads=2, rms_eps=1e-3, rope_theta=500.0, seed=12)}


def run_script(*args, subprocess_run=False):
    """convert_weights.py's main() in this process (fast), or as a real program."""
    if subprocess_run:
        return subprocess.run([sys.executable, str(ROOT / "convert_weights.py"), *map(str, args)],
                              capture_output=True, text=True, cwd=ROOT)
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_weights", ROOT / "convert_weights.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = script.main([str(a) for a in args])
        except SystemExit as e:  # argparse rejects bad options this way
            code = e.code
    return subprocess.CompletedProcess(args, code, "", err.getvalue())


def check_against_hf(hf, out: Path):
    model = minifastv.load(out, dtype=None)
    ids = random_prompt(torch.Generator().manual_seed(5), 12, [4])
    px = random_pixels(1, seed=6)
    expanded = torch.tensor([expand_images(ids, N_PATCHES)])
    with torch.no_grad():
        ref = hf(input_ids=expanded, pixel_values=px).logits[:, -1]
        ref_ids = hf.generate(input_ids=expanded, pixel_values=px, max_new_tokens=10, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[:, expanded.shape[1]:]
        ours = torch.tensor([[model.config.image_token_id if t == IMAGE_TOKEN else t for t in ids]])
        got = model(ours, px)[:, -1]
    assert (got - ref).abs().max() <= 1e-4
    assert generate(model, ours, px, max_new_tokens=10).tolist() == ref_ids.tolist()
    return model


LAYOUTS = {"llava-hf": write_llava_hf, "transformers5": write_transformers5, "save_pretrained": write_save_pretrained}


@pytest.mark.parametrize("attn", ["mha", "gqa"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hf_layouts(hf_models, tokenizer_json, tmp_path, layout, attn):
    src = tmp_path / "src"
    src.mkdir()
    LAYOUTS[layout](hf_models[attn], src)
    shutil.copy(tokenizer_json, src / "tokenizer.json")
    # One case runs as a separate program, the others call its main() here.
    result = run_script(src, tmp_path / "out", subprocess_run=(layout, attn) == ("llava-hf", "mha"))
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and "[1/" in result.stderr  # progress lines
    check_against_hf(hf_models[attn], tmp_path / "out")


@pytest.mark.parametrize("attn", ["mha", "gqa"])
@pytest.mark.parametrize("tower", ["clip-model", "vision-bin", "vision-bare", "embedded"])
def test_original_layout(hf_models, tokenizer_json, tmp_path, attn, tower):
    hf = hf_models[attn]
    src, clip = tmp_path / "llava-v1.5", tmp_path / "clip"
    src.mkdir()
    clip.mkdir()
    if tower == "embedded":
        write_original(hf, src, tower=None)
        (clip / "config.json").write_text(json.dumps(hf.config.vision_config.to_dict()))  # config only
    else:
        write_original(hf, src, tower=clip)
        write_clip(hf, clip, tower)
    (src / "tokenizer.model").write_bytes(b"sentencepiece")  # what the original ships instead of tokenizer.json
    result = run_script(src, tmp_path / "out", "--vision-tower", clip)
    assert result.returncode == 2 and "Pass --tokenizer FILE" in result.stderr
    assert "only a SentencePiece tokenizer.model" in result.stderr
    result = run_script(src, tmp_path / "out", "--vision-tower", clip, "--tokenizer", tokenizer_json)
    assert result.returncode == 0, result.stderr
    model = check_against_hf(hf, tmp_path / "out")
    assert model.config.image_token_id == -200


def test_dtype_option(hf_models, tokenizer_json, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_transformers5(hf_models["gqa"], src)
    shutil.copy(tokenizer_json, src / "tokenizer.json")
    convert(src, tmp_path / "out", dtype="bfloat16", max_shard_bytes=30_000, log=lambda _: None)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    model = minifastv.load(tmp_path / "out", dtype=None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --- errors -------------------------------------------------------------------------------------------


@pytest.fixture
def src(hf_models, tokenizer_json, tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    write_llava_hf(hf_models["gqa"], d)
    shutil.copy(tokenizer_json, d / "tokenizer.json")
    return d


def edit_shard(d: Path, edit):
    file = d / "model-00001-of-00002.safetensors"
    from safetensors.torch import load_file

    state = load_file(file)
    edit(state)
    save_file(state, str(file))


def add_unknown(state):
    state["language_model.model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)


def reshape_embed(state):
    key = next(k for k in state if k.endswith("embed_tokens.weight") or k.endswith("class_embedding"))
    state[key] = state[key][..., :-1].contiguous()


def drop_tensor(state):
    del state[next(iter(state))]


@pytest.mark.parametrize("damage, message", [
    (lambda d: edit_shard(d, add_unknown), r"model-00001-of-00002\.safetensors: unknown tensor "
                                           r"'language_model\.model\.layers\.0\.self_attn\.q_norm\.weight'"),
    (lambda d: (d / "model-00002-of-00002.safetensors").unlink(), r"model-00002-of-00002\.safetensors: weight file not found"),
    (lambda d: edit_shard(d, reshape_embed), r"has shape \[\d+(, \d+)?\], but .*config\.json implies"),
    (lambda d: edit_shard(d, drop_tensor), r"no source tensor for \['"),
    (lambda d: (d / "model-00001-of-00002.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage"),
     r"model-00001-of-00002\.safetensors: not a readable safetensors file"),
    (lambda d: (d / "config.json").write_text("{"), r"config\.json: not valid JSON"),
], ids=["unknown-key", "missing-shard", "shape-mismatch", "missing-tensor", "corrupt-file", "corrupt-config"])
def test_errors_name_the_problem_and_leave_nothing(src, tmp_path, damage, message):
    damage(src)
    with pytest.raises((ConversionError, FileNotFoundError, ValueError), match=message):
        convert(src, tmp_path / "out", log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], "a partial output was left behind"


def test_bad_dtype(src, tmp_path):
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        convert(src, tmp_path / "out", dtype="int8", log=lambda _: None)
    result = run_script(src, tmp_path / "out", "--dtype", "fp8")
    assert result.returncode == 2 and "invalid choice: 'fp8'" in result.stderr


def test_existing_output_needs_force(src, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="out: already exists"):
        convert(src, tmp_path / "out", log=lambda _: None)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    convert(src, tmp_path / "out", force=True, log=lambda _: None)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").exists()


class Exploit:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickle_with_code_is_refused(hf_models, tokenizer_json, tmp_path, capfd):
    src, clip = tmp_path / "src", tmp_path / "clip"
    src.mkdir()
    clip.mkdir()
    write_original(hf_models["mha"], src, tower=clip)
    write_clip(hf_models["mha"], clip, "vision-bare")
    torch.save({"model.norm.weight": Exploit()}, src / "pytorch_model-00002-of-00002.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00002\.bin: refused or unreadable"):
        convert(src, tmp_path / "out", vision_tower=clip, tokenizer=tokenizer_json, log=lambda _: None)
    assert "pickle code ran" not in capfd.readouterr().out
    assert not (tmp_path / "out").exists()


def test_missing_vision_tower_is_explained(hf_models, tokenizer_json, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_original(hf_models["mha"], src, tower=tmp_path / "unused")  # no tower in the shards
    cfg = json.loads((src / "config.json").read_text())
    cfg["mm_vision_tower"] = "some/other-clip"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="no vision tower: pass --vision-tower DIR"):
        convert(src, tmp_path / "out", tokenizer=tokenizer_json, log=lambda _: None)


def test_original_layout_uses_a_local_mm_vision_tower(hf_models, tokenizer_json, tmp_path):
    """config.json's mm_vision_tower naming a CLIP directory that exists is the tower when --vision-tower is
    not given, and the conversion says so; a name that is not a directory here changes nothing."""
    hf = hf_models["gqa"]
    src, clip = tmp_path / "llava-v1.5", tmp_path / "clip"
    src.mkdir()
    clip.mkdir()
    write_original(hf, src, tower=clip)
    write_clip(hf, clip, "vision-bare")
    cfg = json.loads((src / "config.json").read_text())
    cfg["mm_vision_tower"] = str(clip)
    (src / "config.json").write_text(json.dumps(cfg))
    result = run_script(src, tmp_path / "out", "--tokenizer", tokenizer_json)
    assert result.returncode == 0, result.stderr
    assert f"vision tower: {clip} (mm_vision_tower in" in result.stderr
    check_against_hf(hf, tmp_path / "out")


def test_llava_15_13b_converts_to_the_shape_the_13b_benchmark_measures():
    """llava-hf/llava-1.5-13b-hf's config.json (as published) reads as the 13B preset's tower and decoder (40
    layers, 40 heads, 5120 wide, 13,824 intermediate): the shape `bench --size 13b` builds and measures."""
    from minifastv.bench.cpu7b import bench_config
    from minifastv.config import LlavaConfig
    from minifastv.convert import config_from_hf

    published = {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
        "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu", "tie_word_embeddings": False,
        "text_config": {"_name_or_path": "lmsys/vicuna-13b-v1.5", "architectures": ["LlamaForCausalLM"],
                        "hidden_size": 5120, "intermediate_size": 13824, "max_position_embeddings": 4096,
                        "model_type": "llama", "num_attention_heads": 40, "num_hidden_layers": 40,
                        "num_key_value_heads": 40, "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                          "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}
    config, preset = config_from_hf(published), LlavaConfig.from_name("llava-1.5-13b")
    text = dataclasses.replace(config.text, vocab_size=32000)   # llava-hf pads the vocabulary by 64 rows
    assert config.text.vocab_size == 32064 and (text, config.vision, config.projector_type) == (
        preset.text, preset.vision, preset.projector_type)
    measured = bench_config(None, None, "llava", "13b")
    assert (measured.text, measured.vision) == (text, config.vision)
