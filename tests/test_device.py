"""The same answers on an accelerator as on the CPU: load straight onto the device, FastV (its attention row,
the pruned KV cache), random dropping, quantized linears and the command line's --device.

These need a CUDA or MPS device and are skipped without one (CI has none); the README's note on devices says
where they were last run.
"""

import copy

import pytest
import torch

import minifastv
from minifastv import FastV, RandomDrop, generate
from minifastv.config import QuantConfig
from minifastv.data import SAMPLES, TINY_MODEL
from minifastv.quant.linear import quantize_model
from shapes import make_batch

DEVICES = [d for d, ok in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())) if ok]
pytestmark = pytest.mark.skipif(not DEVICES, reason="no CUDA or MPS device on this machine")


@pytest.fixture(scope="module", params=DEVICES or ["none"])
def pair(request, tiny_pipe):
    cpu = tiny_pipe
    return cpu, minifastv.load(TINY_MODEL, dtype="float32", device=request.param)


@torch.no_grad()
@pytest.mark.parametrize("fastv", [None, FastV(2, 0.5), RandomDrop(1, 0.75, seed=3)],
                         ids=["off", "fastv", "random"])
def test_device_matches_cpu(pair, fastv):
    cpu, dev = pair
    assert dev.device.type != "cpu" and all(p.device == dev.device for p in dev.parameters())
    batch, _ = make_batch(cpu, "heldout", range(6))  # a left-padded batch, made on the CPU
    ids, mask, pixels, cpu = batch.input_ids, batch.attention_mask, batch.pixel_values, cpu.model
    ref = cpu.prefill(ids, pixels, attention_mask=mask, prune=fastv)
    got = dev.prefill(ids, pixels, attention_mask=mask, prune=fastv)  # inputs move to the model's device
    assert got.logits.device == dev.device
    assert got.kept_image_slots() == ref.kept_image_slots()
    torch.testing.assert_close(got.logits.cpu(), ref.logits, atol=2e-4, rtol=0)
    out_cpu = generate(cpu, ids, pixels, attention_mask=mask, prune=fastv, max_new_tokens=4)
    out_dev = generate(dev, ids, pixels, attention_mask=mask, prune=fastv, max_new_tokens=4)
    assert out_dev.device == dev.device and torch.equal(out_dev.cpu(), out_cpu)


@torch.no_grad()
@pytest.mark.parametrize("method", [QuantConfig("int8"), QuantConfig("int4", 32)], ids=["int8", "int4"])
def test_quantized_on_device_matches_cpu_blockwise(pair, method):
    cpu, dev = pair
    batch, _ = make_batch(cpu, "heldout", range(4))
    ids, mask, pixels = batch.input_ids, batch.attention_mask, batch.pixel_values
    q_cpu = quantize_model(copy.deepcopy(cpu.model), method, pack=False)  # the path every device runs
    q_dev = quantize_model(copy.deepcopy(dev), method)
    torch.testing.assert_close(q_dev(ids, pixels, attention_mask=mask).cpu(), q_cpu(ids, pixels, attention_mask=mask),
                               atol=2e-4, rtol=0)


def test_cli_runs_on_the_device(capsys):
    from minifastv.cli import main

    for device in DEVICES:
        code = main(["generate", "--image", str(SAMPLES / "heldout_0.png"), "--prompt",
                     "what colour is the triangle in row four column four?", "--device", device, "--fastv-k", "2"])
        out = capsys.readouterr()
        assert code == 0 and out.out.startswith("red") and f", {device}" in out.err, out.err
