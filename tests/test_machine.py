"""Device, float dtype and thread choices: what `auto` picks on which machine, that the command line's
--device, --dtype and --threads reach the model, and one-line errors for what the machine cannot do."""

import dataclasses
import os

import pytest
import torch

import minifastv
import minifastv.machine as machine
from minifastv.cli import main
from minifastv.data import SAMPLES, TINY_MODEL

IMAGE = SAMPLES / "heldout_0.png"


@pytest.fixture(scope="module")
def half_ckpt(tmp_path_factory):
    """The tiny preset with random weights, saved in fp16 (as real LLaVA checkpoints are)."""
    import train_tiny

    tok = train_tiny.build_tokenizer()
    model = train_tiny.build_model(tok, seed=0).half()
    return minifastv.save(model, tok, tmp_path_factory.mktemp("half") / "ckpt")


@pytest.mark.parametrize("native, expected", [(False, torch.float32), (True, torch.bfloat16)])
def test_auto_dtype_follows_native_bf16(half_ckpt, monkeypatch, native, expected):
    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(machine, "SMALL_DECODER_BYTES", 0)   # the tiny preset stands for a large model here
    model = minifastv.load(half_ckpt)  # dtype="auto" is the default
    table = model.llm.embed_tokens.weight
    assert {p.dtype for p in model.parameters() if p is not table} == {expected}  # the vision tower included
    assert model.vision.patch_embed.weight.dtype == model.dtype == expected
    assert machine.auto_dtype(torch.device("cpu"))[0] == expected
    # a lookup table is never widened: its fp16 rows are cast when looked up
    assert table.dtype == torch.float16
    ids = torch.tensor([[1, 5, 9]])
    assert model.embed_tokens(ids).dtype == expected
    assert torch.equal(model.embed_tokens(ids), table[ids].to(expected))


def test_auto_keeps_a_model_too_small_for_bf16_in_fp32(half_ckpt, monkeypatch):
    """With native bf16, a decoder whose fp32 weights are under SMALL_DECODER_BYTES (the tiny model's 3 MiB)
    stays fp32; the 7B, float or quantized, computes in bf16. The size is what the model holds."""
    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: True)
    model = minifastv.load(half_ckpt)
    assert model.dtype == torch.float32
    held = sum(p.numel() for name, p in model.llm.named_parameters() if not name.startswith("embed_tokens"))
    assert machine.decoder_fp32_bytes(model.config.text) == 4 * held
    dtype, why = machine.auto_dtype(torch.device("cpu"), model.config)
    assert dtype == torch.float32 and "a small model: 3 MiB" in why
    quantized = dataclasses.replace(model.config, quant=minifastv.config.QuantConfig("int8"))
    assert machine.auto_dtype(torch.device("cpu"), quantized)[0] == torch.float32    # one rule, quantized or not
    big = minifastv.LlavaConfig.from_name("llava-1.5-7b")
    assert machine.auto_dtype(torch.device("cpu"), big)[0] == torch.bfloat16
    assert machine.auto_dtype(torch.device("cpu"), dataclasses.replace(big, quant=quantized.quant))[0] == \
        torch.bfloat16
    assert machine.decoder_fp32_bytes(big.text) > 25e9
    monkeypatch.setattr(machine, "SMALL_DECODER_BYTES", machine.decoder_fp32_bytes(model.config.text))
    assert minifastv.load(half_ckpt).dtype == torch.bfloat16           # at the threshold: not small


def test_dtype_none_keeps_the_stored_dtype(half_ckpt):
    assert {p.dtype for p in minifastv.load(half_ckpt, dtype=None).parameters()} == {torch.float16}


def test_a_lookup_table_is_narrowed_but_never_widened():
    narrowed = minifastv.load(TINY_MODEL, dtype="bfloat16")  # stored fp32
    assert {p.dtype for p in narrowed.parameters()} == {torch.bfloat16}


def test_unavailable_devices_are_named(half_ckpt, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda': CUDA is not available on this machine"):
        minifastv.load(half_ckpt, device="cuda")
    with pytest.raises(ValueError, match="device 'mps': MPS .* is not available on this machine"):
        machine.resolve_device("mps")
    with pytest.raises(ValueError, match="device .tpu. is not a device name; choose one of cpu, cuda, mps"):
        machine.resolve_device("tpu")


def test_physical_cores_and_threads():
    assert 1 <= machine.physical_cores() <= os.cpu_count()
    before = torch.get_num_threads()
    try:
        assert machine.set_threads(1) == 1 and torch.get_num_threads() == 1
        assert machine.set_threads(None) == machine.physical_cores() == torch.get_num_threads()
        for bad in (0, -2, 1.5, True):
            with pytest.raises(ValueError, match="threads must be a positive integer"):
                machine.set_threads(bad)
    finally:
        torch.set_num_threads(before)


# --- the command line ------------------------------------------------------------------------------------


def run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def generate(capsys, model, *extra):
    return run(capsys, "generate", "--model", model, "--image", IMAGE, "--prompt", "what colour", "--max-new-tokens",
               2, *extra)


def test_cli_device_and_threads_errors_are_one_line(half_ckpt, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = generate(capsys, half_ckpt, "--device", "cuda")
    assert code == 2 and err.count("\n") == 1 and "error: device 'cuda': CUDA is not available" in err
    code, _, err = generate(capsys, half_ckpt, "--threads", "0")
    assert code == 2 and err.count("\n") == 1 and "error: threads must be a positive integer, got 0" in err


def test_cli_options_reach_the_model(half_ckpt, capsys, monkeypatch):
    import minifastv.pipeline

    seen, real = [], minifastv.pipeline.load
    monkeypatch.setattr(minifastv.pipeline, "load", lambda *a, **k: seen.append(k) or real(*a, **k))
    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: False)
    before = torch.get_num_threads()
    try:
        code, _, err = generate(capsys, half_ckpt, "--threads", 1, "--check-weights")
        assert code == 0 and torch.get_num_threads() == 1 and "1 threads" in err
        assert seen[-1]["dtype"] == "auto" and seen[-1]["check"] is True
        assert "float32 float weights (the CPU has no native bf16" in err and "peak RSS" in err
        code, _, err = generate(capsys, half_ckpt, "--dtype", "bfloat16")
        assert code == 0 and seen[-1]["dtype"] == "bfloat16" and seen[-1]["check"] is False
        assert "bfloat16 float weights (as asked)" in err
        assert f"{machine.physical_cores()} threads" in err and torch.get_num_threads() == machine.physical_cores()
        monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: True)
        code, _, err = generate(capsys, half_ckpt)
        assert code == 0 and "float32 float weights (a small model: 3 MiB" in err
        monkeypatch.setattr(machine, "SMALL_DECODER_BYTES", 0)
        code, _, err = generate(capsys, half_ckpt)
        assert code == 0 and "bfloat16 float weights (the CPU has native bf16" in err
    finally:
        torch.set_num_threads(before)


def test_cli_quantize_then_generate(half_ckpt, capsys, tmp_path):
    code, _, err = run(capsys, "quantize", half_ckpt, tmp_path / "q4", "--method", "int4", "--group-size", 32)
    assert code == 0, err
    assert minifastv.load(tmp_path / "q4").config.quant == minifastv.config.QuantConfig("int4", 32)
    code, out, err = generate(capsys, tmp_path / "q4")
    assert code == 0 and "int4 decoder linears" in err and "image tokens kept" in out
    for extra, message in ((["--group-size", 48], "int4 group_size must be one of (32, 64, 128, 256), got 48"),
                           (["--group-size", 128], "group_size 128 does not divide text intermediate_size 352")):
        code, _, err = run(capsys, "quantize", half_ckpt, tmp_path / "bad", "--method", "int4", *extra)
        assert code == 2 and message in err and not (tmp_path / "bad").exists(), err
    code, _, err = run(capsys, "quantize", half_ckpt, tmp_path / "q8", "--method", "int8", "--group-size", 32)
    assert code == 2 and "--group-size applies to int4" in err


def test_cli_activations_int8_reaches_prefill_and_decode(half_ckpt, capsys, tmp_path, monkeypatch):
    import minifastv.quant.kernels
    import minifastv.quant.linear

    assert run(capsys, "quantize", half_ckpt, tmp_path / "q8", "--method", "int8")[0] == 0
    calls, real = [], minifastv.quant.int8_activation_matmul
    monkeypatch.setattr(minifastv.quant.linear, "int8_activation_matmul", lambda *a: calls.append(a[0].shape) or real(*a))
    code, out, err = generate(capsys, tmp_path / "q8")
    assert code == 0 and not calls and "int8 activations" not in err                 # weight-only by default
    assert "kernels (int8): decode weight_int8pack_mm, prefill blockwise; the defaults: a small model" in err
    code, out, err = generate(capsys, tmp_path / "q8", "--activations", "int8")
    assert code == 0 and "int8 decoder linears, int8 activations," in err and "image tokens kept" in out
    assert "kernels (int8 + int8 activations): decode int_mm, prefill int_mm; the defaults: a small model" in err
    rows = {shape[0] for shape in calls}
    assert max(rows) > minifastv.quant.linear.INT8_KERNEL_MAX_ROWS and 1 in rows           # the prefill and decode steps
    code, _, err = generate(capsys, half_ckpt, "--activations", "int8")
    assert code == 2 and "int8 activations need an int8-quantized checkpoint" in err
    monkeypatch.setattr(minifastv.quant.kernels, "int8_gemm_exact", lambda: False)
    code, _, err = generate(capsys, tmp_path / "q8", "--activations", "int8")
    assert code == 2 and "not available on this CPU" in err
