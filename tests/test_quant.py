"""Weight-only int8 / int4 quantization: accuracy against fp32, the kernels against a plain dequantized
reference, the stored format's round trips, and damaged quantized checkpoints.

The accuracy bound is derived, not tuned. Rounding a weight to a grid of step s adds an error spread evenly
over +-s/2, of variance s^2/12 (s: the int8 row scale, or the int4 group scale). A "noise twin", the fp32
model with Gaussian noise of exactly that variance added to the same weights, shows what an error of that
size costs on these logits. Measured on the parity fixtures, quantization's mean |logit error| is 0.91-1.05x
its twin's and its max 0.69-1.19x (int8 ~0.025 s mean / 0.26 s max, int4 with groups of 32 ~0.3 s / 3.2 s,
s the logits' std). The tests allow 1.3x the twin's mean and 2x its max (the twin is itself a random draw,
averaged over three), which a wrong scale, zero point, nibble order or group layout exceeds many times over.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import (activation_noise, assert_decode_within_noise_twin, build_tokenizer, hf_llava, noise_twin, random_pixels, random_prompt,
                     to_minifastv)
from safetensors.torch import load_file, save_file

import minifastv
import minifastv.quant.linear as quant
from minifastv import CheckpointError, generate
from minifastv.checkpoint import quantize_checkpoint
from minifastv.config import QuantConfig
from minifastv.quant.linear import (Int4Linear, Int8Linear, cpu_int4_block, pack_int4, quantize_model, quantize_weight,
                                    quantized_linear, quantized_modules, repack_for_cpu, unpack_cpu_int4, unpack_int4)

INT8, INT4 = QuantConfig("int8"), QuantConfig("int4", 32)
FIXTURES = {
    "mha": dict(n_kv_heads=4),
    "gqa-eps1e-3-theta500": dict(n_kv_heads=2, rms_eps=1e-3, rope_theta=500.0, seed=1),
    "mqa-feature-layer-1": dict(n_kv_heads=1, rms_eps=1e-4, feature_layer=1, seed=2),
}


@pytest.fixture(scope="module", params=list(FIXTURES))
def fp32(request):
    return to_minifastv(hf_llava(**FIXTURES[request.param]))


@torch.no_grad()
@pytest.mark.parametrize("method", [INT8, INT4], ids=["int8", "int4"])
@pytest.mark.parametrize("pack", [True, False], ids=["as-loaded", "stored-form"])
def test_logits_close_to_fp32_as_the_noise_model_predicts(fp32, method, pack):
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(0), 20, [5, 12])])
    px = random_pixels(2, seed=1)
    ref = fp32(ids, px)
    q = quantize_model(copy.deepcopy(fp32), method, pack=pack)
    err = (q(ids, px) - ref).abs()
    twins = [(noise_twin(fp32, q, seed)(ids, px) - ref).abs() for seed in range(3)]
    twin_mean, twin_max = (sum(getattr(t, f)() for t in twins) / 3 for f in ("mean", "max"))
    assert err.mean() <= 1.3 * twin_mean and err.max() <= 2 * twin_max, (err.mean(), twin_mean, err.max(), twin_max)
    s = ref.std()  # and the absolute figures the README states
    assert err.max() <= (0.4 if method.method == "int8" else 5.0) * s
    assert err.mean() <= (0.05 if method.method == "int8" else 0.5) * s


@torch.no_grad()
def test_int8_activations_stay_within_their_noise_twin(fp32):
    """int8 activations at prefill: the logits' error against fp32 stays within what the twin with both noises
    (weights and activations) shows, as the weight-only test bounds it."""
    from minifastv.quant import set_activations

    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(0), 20, [5, 12])])   # 53 rows: prefill path
    px = random_pixels(2, seed=1)
    ref = fp32(ids, px)
    q = quantize_model(copy.deepcopy(fp32), INT8)
    weight_only = (q(ids, px) - ref).abs()
    set_activations(q, "int8")
    err = (q(ids, px) - ref).abs()
    twins = [(activation_noise(noise_twin(fp32, q, seed), seed)(ids, px) - ref).abs() for seed in range(3)]
    twin_mean, twin_max = (sum(getattr(t, f)() for t in twins) / 3 for f in ("mean", "max"))
    assert err.mean() <= 1.3 * twin_mean and err.max() <= 2 * twin_max, (err.mean(), twin_mean, err.max(), twin_max)
    assert err.mean() > weight_only.mean()                     # the activations were rounded too
    assert err.max() <= 0.4 * ref.std() and err.mean() <= 0.05 * ref.std()


@torch.no_grad()
def test_int8_activations_at_decode_stay_within_their_noise_twin(fp32):
    """Decode steps (one row, the KV cache) round the activations too: their logits' error against fp32 recomputed
    from scratch stays within the twin's with both noises (the weight-only kernel's bf16 activations are not exact
    either: on these small widths its error is of the same size)."""
    from minifastv.quant import set_activations

    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(2), 12, [4])])
    px = random_pixels(1)
    q = quantize_model(copy.deepcopy(fp32), INT8)
    _, weight_only = generate(q, ids, px, max_new_tokens=6, return_logits=True)
    set_activations(q, "int8")
    logits = assert_decode_within_noise_twin(fp32, q, ids, px, 6, activations=True)
    assert not torch.equal(logits, weight_only)                # the decode steps did not run the weight-only kernel


@pytest.mark.parametrize("max_rows", [None, 7], ids=["one-pass", "passes-of-7"])
def test_int8_activation_matmul_is_the_rounded_product(max_rows, monkeypatch):
    """Each row rounded to int8 on its own absmax / 127, the exact integer product, both scales: written out; the
    same when the 40 rows run in passes (int8act.MAX_ROWS; 6 passes of at most 7 here)."""
    from minifastv.quant import int8act
    from minifastv.quant.int8act import int8_activation_matmul

    if max_rows:
        monkeypatch.setattr(int8act, "MAX_ROWS", max_rows)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 96, generator=g) * torch.linspace(0.1, 10, 40)[:, None]
    q = quantize_weight(torch.randn(24, 96, generator=g), INT8)
    step = x.double().abs().amax(1, keepdim=True) / 127
    rounded = (x.double() / step).round()
    want = (rounded @ q["weight"].double().t()) * step * q["scale"].double()
    torch.testing.assert_close(int8_activation_matmul(x, q["weight"], q["scale"]).double(), want, rtol=1e-6, atol=1e-6)
    half = int8_activation_matmul(x.bfloat16(), q["weight"], q["scale"])      # a bf16 model's linear stays bf16
    assert half.dtype == torch.bfloat16


def test_int8_activations_are_refused_where_they_cannot_run(float_ckpt, monkeypatch):
    from minifastv.quant import kernels

    with pytest.raises(ValueError, match="need an int8-quantized checkpoint .* this one is float"):
        kernels.set_activations(minifastv.load(float_ckpt), "int8")
    with pytest.raises(ValueError, match="activations must be one of float, int8"):
        kernels.set_activations(minifastv.load(float_ckpt), "int4")
    int8_model = quantize_model(minifastv.load(float_ckpt, dtype="float32"), INT8)
    monkeypatch.setattr(kernels, "int8_gemm_exact", lambda: False)
    with pytest.raises(ValueError, match="not available on this CPU: its integer GEMM"):
        kernels.set_activations(int8_model, "int8")
    monkeypatch.setattr(kernels, "int8_gemm_exact", lambda: True)
    kernels.set_activations(int8_model, "int8")
    assert {m.activations for m in int8_model.modules() if isinstance(m, Int8Linear)} == {"int8"}
    kernels.set_activations(int8_model, "float")
    assert {m.activations for m in int8_model.modules() if isinstance(m, Int8Linear)} == {"float"}


def test_int8_gemm_exactness_probe_matches_this_machine():
    from minifastv.quant.int8act import int8_gemm_exact

    g = torch.Generator().manual_seed(1)
    x, w = (torch.randint(-127, 128, shape, dtype=torch.int8, generator=g) for shape in ((48, 1024), (96, 1024)))
    assert int8_gemm_exact() == torch.equal(torch._int_mm(x, w.t()).long(), x.long() @ w.long().t())


def test_quantized_generation_with_cache_equals_recompute(fp32):
    """The decode steps (one row: the weight-only kernels) agree with full prefills (many rows: the blockwise
    path) on the same quantized weights."""
    q = quantize_model(copy.deepcopy(fp32), INT8)
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(2), 12, [4])])
    px = random_pixels(1)
    out, logits = generate(q, ids, px, max_new_tokens=6, return_logits=True)
    with torch.no_grad():
        for step in range(6):
            full = q(torch.cat([ids, out[:, :step]], 1), px)[:, -1]
            assert full.argmax(-1).item() == out[0, step].item()
            # the kernels round activations to bf16: within test_dtypes.py's bound for a bf16 model
            assert (full - logits[:, step]).abs().max() <= 0.35 * full.std()


@pytest.mark.parametrize("method", [INT8, INT4, QuantConfig("int4", 64)], ids=["int8", "int4-g32", "int4-g64"])
@pytest.mark.parametrize("rows", [1, 7, 40, 300])
@pytest.mark.parametrize("out_features", [200, 256])
def test_every_kernel_path_equals_the_dequantized_weight(method, rows, out_features, monkeypatch):
    """Kernel (few rows), blockwise (many rows), packed or stored form: x @ W.T with W the dequantized
    weight. Blocks of 48 rows (64 when packed for AVX-512), so that 200 outputs end in a partial block."""
    monkeypatch.setattr(quant, "MIN_BLOCK_ROWS", 16)
    monkeypatch.setattr(quant, "BLOCK_BYTES", 48 * 192 * 4)
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(out_features, 192, generator=g) * 0.05, torch.randn(rows, 192, generator=g)
    for pack in (False, True):
        linear = quantized_linear(w, method, pack)
        ref = F.linear(x, stored_linear(w, method).dequantize())
        # The kernels round activations to bf16, and int4's packed form holds its offsets (8 - zero) * scale in
        # bf16; everything else computes exactly what the stored form says, in fp32.
        packed_int4 = isinstance(linear, Int4Linear) and linear.packed_for_cpu is not None
        kernel = rows <= (quant.INT8_KERNEL_MAX_ROWS if method.method == "int8" else quant.INT4_KERNEL_MAX_ROWS)
        tolerance = 0.01 if packed_int4 or kernel and method.method == "int8" else 1e-4
        torch.testing.assert_close(linear(x), ref, atol=tolerance * ref.abs().max(), rtol=0)


def stored_linear(w, method):
    return quantized_linear(w, method, pack=False)


def test_dequantized_weight_is_the_rounding_of_the_weight():
    """Against the format's definition, written out plainly: a scale per row (int8) or per group (int4),
    round to nearest, errors at most half a step."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    w[3] = 0  # an all-zero row must come back as zeros
    w8 = stored_linear(w, INT8)
    scale = w.abs().amax(1) / 127
    assert torch.allclose(w8.scale.float(), scale, rtol=2**-8)
    assert ((w8.dequantize() - w).abs() <= w8.scale.float()[:, None] / 2 + 1e-6).all()
    assert (w8.dequantize()[3] == 0).all()
    w4 = stored_linear(w, INT4)
    q, zero, step = unpack_int4(w4.weight).float(), w4.zero.float(), w4.scale.float()
    for row in (0, 3, 47):
        for group in range(2):
            cols = slice(32 * group, 32 * group + 32)
            plain = (q[row, cols] - zero[row, group]) * step[row, group]
            assert torch.equal(w4.dequantize()[row, cols], plain)
            assert ((plain - w[row, cols]).abs() <= step[row, group] / 2 + 1e-6).all()
    assert (w4.dequantize()[3] == 0).all()
    assert torch.equal(unpack_int4(w4.weight)[5, :4], torch.tensor([w4.weight[5, 0] & 15, w4.weight[5, 0] >> 4,
                                                                     w4.weight[5, 1] & 15, w4.weight[5, 1] >> 4]))


def test_cpu_kernel_layout_is_known_and_read_back_exactly():
    block = cpu_int4_block()
    assert block in (32, 64), "this torch's CPU int4 layout changed; see quant.cpu_int4_block"
    q = torch.randint(0, 16, (4 * block, 96), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(repack_for_cpu(pack_int4(q.to(torch.uint8)), block), packed)  # minifastv packs as torch
    assert torch.equal(unpack_cpu_int4(packed, block, block, 3 * block, 96), q[block:3 * block].to(torch.uint8))


def test_kernel_choice_follows_the_row_count(monkeypatch):
    calls = []
    for name in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    w = torch.randn(128, 64) * 0.05
    for method, limit, kernel in ((INT8, quant.INT8_KERNEL_MAX_ROWS, "_weight_int8pack_mm"),
                                  (INT4, quant.INT4_KERNEL_MAX_ROWS, "_weight_int4pack_mm_for_cpu")):
        linear = quantized_linear(w, method, pack=True)
        for rows, expected in ((1, [kernel]), (limit, [kernel]), (limit + 1, [])):
            calls.clear()
            linear(torch.randn(rows, 64))
            assert calls == expected, (method, rows)
    linear = quantized_linear(w, INT8, pack=True)
    linear.activations = "int8"                    # int8 activations: the integer GEMM at every row count
    monkeypatch.setattr(torch, "_int_mm", lambda *a, _real=torch._int_mm: calls.append("_int_mm") or _real(*a))
    for rows in (1, quant.INT8_KERNEL_MAX_ROWS + 1):
        calls.clear()
        linear(torch.randn(rows, 64))
        assert calls == ["_int_mm"], rows


# --- the stored format ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    """A float minifastv checkpoint of a random transformers LLaVA, through conversion."""
    from minifastv.checkpoint import save

    path = tmp_path_factory.mktemp("float") / "ckpt"
    model = to_minifastv(hf_llava(n_kv_heads=2, seed=5))
    tok = minifastv.Tokenizer.from_file(build_tokenizer(path.parent / "tokenizer.json"), bos_token_id=1,
                                        eos_token_id=2, image_token_id=127)
    save(model, tok, path)
    return path


@pytest.fixture(scope="module", params=[INT8, INT4], ids=["int8", "int4"])
def quantized(request, float_ckpt, tmp_path_factory):
    return quantize_checkpoint(float_ckpt, tmp_path_factory.mktemp("q") / "ckpt", request.param, log=lambda _: None)


def test_quantize_save_load_round_trip_is_exact(float_ckpt, quantized, tmp_path):
    method = json.loads((quantized / "config.json").read_text())["quant"]
    method = QuantConfig(**method)
    fp32 = minifastv.load(float_ckpt, dtype=None)
    stored = load_file(quantized / "model.safetensors")
    for name, linear in quantized_modules(fp32):  # the files hold exactly quantize_weight's output
        for suffix, t in quantize_weight(linear.weight, method).items():
            assert stored[f"{name}.{suffix}"].dtype == t.dtype and torch.equal(stored[f"{name}.{suffix}"], t)
    loaded = minifastv.load(quantized, dtype=None)
    assert loaded.config.quant == method
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {k: v.dtype for k, v in stored.items()}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in stored.items())  # packed, then read back
    in_memory = quantize_model(fp32, method)
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(0), 8, [3])])
    with torch.no_grad():
        assert torch.equal(loaded(ids, random_pixels(1)), in_memory(ids, random_pixels(1)))
        minifastv.save(loaded, minifastv.load_tokenizer(quantized), tmp_path / "again")  # the packed model saves its stored form
        again = minifastv.load(tmp_path / "again", dtype=None)
        assert torch.equal(again(ids, random_pixels(1)), loaded(ids, random_pixels(1)))
    assert load_file(tmp_path / "again" / "model.safetensors").keys() == stored.keys()


def test_quantized_checkpoint_is_smaller(float_ckpt, quantized):
    size = lambda path: (path / "model.safetensors").stat().st_size
    assert size(quantized) < 0.7 * size(float_ckpt)


def edit(path, change):
    state = load_file(path / "model.safetensors")
    change(state)
    save_file(state, str(path / "model.safetensors"))


SCALE = "llm.layers.1.mlp.up_proj.scale"


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.update({SCALE: s[SCALE][:5]}), r"model\.safetensors: llm\.layers\.1\.mlp\.up_proj\.scale has shape"),
    (lambda s: s.update({SCALE: s[SCALE].float()}),
     r"model\.safetensors: llm\.layers\.1\.mlp\.up_proj\.scale has dtype torch\.float32, expected torch\.bfloat16"),
    (lambda s: s.update({"llm.lm_head.weight": s["llm.lm_head.weight"].float()}),
     r"model\.safetensors: llm\.lm_head\.weight has dtype torch\.float32, expected torch\.(int8|uint8)"),
], ids=["scale-shape", "scale-dtype", "weight-dtype"])
def test_damaged_quantized_checkpoint_names_file_and_key(quantized, tmp_path, damage, message):
    import shutil

    broken = shutil.copytree(quantized, tmp_path / "broken")
    edit(broken, damage)
    with pytest.raises(CheckpointError, match=message):
        minifastv.load(broken)


def test_missing_zero_points_and_unknown_method(float_ckpt, tmp_path):
    import shutil

    q4 = quantize_checkpoint(float_ckpt, tmp_path / "q4", INT4, log=lambda _: None)
    missing = shutil.copytree(q4, tmp_path / "no-zero")
    edit(missing, lambda s: s.pop("llm.layers.0.attn.q_proj.zero"))
    with pytest.raises(CheckpointError, match=r"no-zero: missing weight\(s\) \['llm\.layers\.0\.attn\.q_proj\.zero'\]"):
        minifastv.load(missing)
    cfg = json.loads((q4 / "config.json").read_text())
    cfg["quant"]["method"] = "int3"
    (q4 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"q4/config\.json: quantization method 'int3' is not one of int8, int4"):
        minifastv.load(q4)


def test_quantize_refuses_bad_requests(float_ckpt, quantized, tmp_path):
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(quantized, tmp_path / "twice", INT8, log=lambda _: None)
    with pytest.raises(CheckpointError, match="group_size 128 does not divide text dim 64"):
        quantize_checkpoint(float_ckpt, tmp_path / "g128", QuantConfig("int4", 128), log=lambda _: None)
    assert not list(tmp_path.iterdir())


def test_quantize_scans_weights_for_nan(float_ckpt, tmp_path):
    import shutil

    poisoned = shutil.copytree(float_ckpt, tmp_path / "poisoned")
    edit(poisoned, lambda s: s["llm.layers.0.mlp.gate_proj.weight"].__setitem__((0, 0), float("inf")))
    with pytest.raises(CheckpointError, match=r"llm\.layers\.0\.mlp\.gate_proj\.weight contains NaN or infinite"):
        quantize_checkpoint(poisoned, tmp_path / "out", INT8, log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_group_size_is_recorded_and_used(float_ckpt, tmp_path):
    for g in (32, 64):
        if 96 % g:
            continue
        out = quantize_checkpoint(float_ckpt, tmp_path / f"g{g}", QuantConfig("int4", g), log=lambda _: None)
        assert json.loads((out / "config.json").read_text())["quant"] == {"method": "int4", "group_size": g}
        assert load_file(out / "model.safetensors")["llm.layers.0.mlp.down_proj.scale"].shape == (64, 96 // g)


def test_float_parts_stay_float(quantized):
    model = minifastv.load(quantized, dtype="float32")
    assert model.llm.embed_tokens.weight.dtype == model.vision.patch_embed.weight.dtype == torch.float32
    assert isinstance(model.llm.lm_head, (Int8Linear, Int4Linear))
    assert all(isinstance(m, (Int8Linear, Int4Linear)) for _, m in quantized_modules(model))
    assert not any(isinstance(m, torch.nn.Linear) for _, m in quantized_modules(model))
    assert isinstance(model.projector[0], torch.nn.Linear)


def test_int8_weights_misaligned_by_another_writer_still_work(float_ckpt, tmp_path):
    """torch's int8 kernel needs 64-byte aligned weights (it crashed on a mapped weight at offset 56); a file
    written by safetensors itself does not align them, so load reads those into aligned memory."""
    import shutil

    quantized = quantize_checkpoint(float_ckpt, tmp_path / "int8", INT8, log=lambda _: None)
    foreign = shutil.copytree(quantized, tmp_path / "foreign")
    save_file(load_file(foreign / "model.safetensors"), str(foreign / "model.safetensors"))  # safetensors' order
    from minifastv.checkpoint import read_header

    start, header = read_header(foreign / "model.safetensors")
    misaligned = [n for n, e in header.items() if n.endswith("proj.weight") and (start + e["data_offsets"][0]) % 64]
    assert misaligned, "the fixture no longer produces a misaligned int8 weight"
    a, b = minifastv.load(quantized, dtype=None), minifastv.load(foreign, dtype=None)
    assert all(m.weight.data_ptr() % 64 == 0 for _, m in quantized_modules(b))
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(1), 20, [])])  # 21 rows: the int8 kernel
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_save_places_every_tensor_on_a_64_byte_boundary(quantized):
    from minifastv.checkpoint import read_header

    start, header = read_header(quantized / "model.safetensors")
    offsets = {n: start + e["data_offsets"][0] for n, e in header.items() if n != "__metadata__"}
    assert offsets and all(offset % 64 == 0 for offset in offsets.values()), offsets


def test_blocks_are_large_enough_for_a_fast_gemm():
    """A block of fewer than 256 output channels ran 1.5x slower than fp32 (down_proj, 11008 inputs, fp32: a
    4 MiB block holds 95 rows); narrow weights take 4 MiB blocks."""
    down = Int8Linear(11008, 4096, INT8, device="meta")
    assert down.block_rows(torch.float32) == 256 and down.block_rows(torch.bfloat16) == 256
    q = Int8Linear(4096, 4096, INT8, device="meta")
    assert q.block_rows(torch.float32) == 256 and q.block_rows(torch.bfloat16) == 512
    assert Int4Linear(4096, 11008, INT4, device="meta").block_rows(torch.bfloat16) % cpu_int4_block() == 0


@pytest.mark.parametrize("method", [INT8, INT4], ids=["int8", "int4"])
def test_convert_with_quantize_equals_quantizing_the_conversion(tmp_path, method):
    """convert_weights.py SRC OUT --quantize writes what `quantize` makes of the float conversion."""
    from helpers import write_hf_checkpoint

    import convert_weights
    from minifastv.convert import convert

    src = write_hf_checkpoint(hf_llava(n_kv_heads=2, seed=7), tmp_path / "hf")
    group = [] if method.group_size is None else ["--group-size", str(method.group_size)]
    assert convert_weights.main([str(src), str(tmp_path / "direct"), "--quantize", method.method, *group]) == 0
    convert(src, tmp_path / "float", log=lambda _: None)
    quantize_checkpoint(tmp_path / "float", tmp_path / "two-step", method, log=lambda _: None)
    direct, two_step = (load_file(tmp_path / d / "model.safetensors") for d in ("direct", "two-step"))
    assert direct.keys() == two_step.keys() and all(torch.equal(direct[k], two_step[k]) for k in direct)
    assert (json.loads((tmp_path / "direct" / "config.json").read_text())
            == json.loads((tmp_path / "two-step" / "config.json").read_text()))
    assert minifastv.load(tmp_path / "direct").config.quant == method


def test_the_documented_default_int4_group_size_is_the_one_used(tmp_path):
    """The documented default group size (read from docs/cpu.md, not from the library's constant) is what
    `quantize --method int4` and `convert --quantize int4` use when no --group-size is given."""
    import re
    from pathlib import Path

    from helpers import write_hf_checkpoint

    from minifastv.cli import main

    doc = (Path(__file__).parent.parent / "docs" / "cpu.md").read_text()
    documented = int(re.search(r"per\s+group\s+of\s+G\s+inputs\s+\(default\s+(\d+)", doc).group(1))
    src = write_hf_checkpoint(hf_llava(seed=3, text_dim=512, text_intermediate=1024, text_layers=1), tmp_path / "hf")
    assert main(["convert", str(src), str(tmp_path / "direct"), "--quantize", "int4"]) == 0
    assert main(["convert", str(src), str(tmp_path / "float")]) == 0
    assert main(["quantize", str(tmp_path / "float"), str(tmp_path / "q"), "--method", "int4"]) == 0
    for out in ("direct", "q"):
        quant = json.loads((tmp_path / out / "config.json").read_text())["quant"]
        assert quant == {"method": "int4", "group_size": documented}


def test_int4_groups_keep_zero_in_their_range():
    """Each group's grid runs from min(w, 0) to max(w, 0): zero is a grid point (exact zeros stay exact),
    and groups that lie wholly above or below zero are still covered, each weight within half a step."""
    torch.manual_seed(0)
    mixed = torch.randn(32)
    mixed[::7] = 0.0
    above, below, small = torch.rand(32) + 1.0, -torch.rand(32) - 1.0, torch.rand(32) * 0.01 + 0.01
    w = torch.stack([torch.cat([above, below, mixed, small]), torch.cat([mixed, small, above, below])])
    stored = quantize_weight(w, QuantConfig("int4", 32))                       # 2 x 128, groups of 32
    q = unpack_int4(stored["weight"]).float().view(2, 4, 32)
    scale, zero = stored["scale"].float(), stored["zero"].float()
    back = ((q - zero[..., None]) * scale[..., None]).view(2, 128)
    assert (w == 0).sum() == 10 and torch.equal(back[w == 0], torch.zeros(10))  # 5 zeros a row, exact
    lo, hi = -zero * scale, (15 - zero) * scale                                 # each group's grid ends
    assert (lo <= 0).all() and (hi >= 0).all()
    assert ((back - w).abs().view(2, 4, 32) <= scale[..., None] * 0.5 + 1e-6).all()


@pytest.mark.parametrize("method", [INT8, INT4], ids=["int8", "int4"])
def test_a_biased_linear_keeps_its_bias_in_float_through_quantize_save_and_load(method):
    """Qwen's q/k/v projections have a bias: quantization replaces the weight and keeps the bias, in floating
    point, through the model's state dict and the loader's empty quantized model."""
    from minifastv.config import LlavaConfig
    from minifastv.models import LlavaModel
    from minifastv.models.qwen import QwenDecoder
    from minifastv.quant.linear import replace_linears

    torch.manual_seed(0)
    model = LlavaModel(LlavaConfig.from_name("tiny"))
    model.llm = QwenDecoder(model.config.text)
    q_proj = model.llm.layers[0].attn.q_proj
    bias, x = q_proj.bias.detach().clone() + 0.5, torch.randn(3, q_proj.in_features)
    with torch.no_grad():
        q_proj.bias.copy_(bias)
    quantize_model(model, method, pack=False)
    linear = model.llm.layers[0].attn.q_proj
    ref = F.linear(x, linear.dequantize(), bias)   # the kernels round activations to bf16 (see above)
    torch.testing.assert_close(linear(x), ref, atol=0.01 * ref.abs().max(), rtol=0)
    state = model.state_dict()
    assert torch.equal(state["llm.layers.0.attn.q_proj.bias"], bias) and "llm.layers.0.attn.o_proj.bias" not in state
    with torch.device("meta"):
        empty = LlavaModel(model.config)
        empty.llm = QwenDecoder(model.config.text)
        replace_linears(empty, method)
    empty.load_state_dict(state, assign=True, strict=True)
    torch.testing.assert_close(empty.llm.layers[0].attn.q_proj(x), linear(x))


def test_the_int8_kernel_takes_activations_at_any_address_and_any_width(monkeypatch):
    """torch's weight-only int8 kernel gave garbage (1e33) or crashed (SIGSEGV) for inputs 40 wide, and crashed on
    bf16 activations not 32-byte aligned. The linear runs such widths blockwise and copies such activations first:
    every width, and rows at every offset into a buffer, equal the reference."""
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a[0].shape) or kernel(*a))
    g = torch.Generator().manual_seed(0)
    for width in (40, 48, 56, 64):
        linear = quantized_linear(torch.randn(64, width, generator=g) * 0.05, INT8, pack=False)
        flat = torch.randn(16 + 2 * width, generator=g).to(torch.bfloat16)
        for offset in range(16):                                    # 2 bytes apart: 14 of 16 misaligned
            for rows in (1, 2):
                x = flat[offset:offset + rows * width].view(rows, width)
                torch.testing.assert_close(linear(x).float(), F.linear(x.float(), linear.dequantize()),
                                           atol=0.02, rtol=0.02)
    assert {shape[1] for shape in calls} == {48, 64}, "the kernel ran for a width it gets wrong, or never ran"
