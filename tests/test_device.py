"""The same answers on an accelerator as on the CPU: load straight onto the device, FastV (its attention row,
the pruned KV cache), random dropping, quantized linears and the command line's --device.

These need a CUDA or MPS device and are skipped without one (CI has none); the README's note on devices says
where they were last run.
"""

import copy
from pathlib import Path

import pytest
import torch

import minifastv
from minifastv import FastV
from minifastv.config import QuantConfig
from minifastv.quant import quantize_model
from minifastv.shapes import make_batch

ROOT = Path(__file__).resolve().parent.parent
DEVICES = [d for d, ok in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())) if ok]
pytestmark = pytest.mark.skipif(not DEVICES, reason="no CUDA or MPS device on this machine")


@pytest.fixture(scope="module", params=DEVICES or ["none"])
def pair(request):
    cpu = minifastv.load(ROOT / "weights" / "tiny", dtype="float32")
    return cpu, minifastv.load(ROOT / "weights" / "tiny", dtype="float32", device=request.param)


@torch.no_grad()
@pytest.mark.parametrize("fastv", [None, FastV(2, 0.5), FastV(1, 0.75, rank="random", seed=3)],
                         ids=["off", "fastv", "random"])
def test_device_matches_cpu(pair, fastv):
    cpu, dev = pair
    assert dev.device.type != "cpu" and all(p.device == dev.device for p in dev.parameters())
    ids, mask, pixels, _ = make_batch(cpu, "heldout", range(6))  # a left-padded batch, made on the CPU
    ref = cpu.prefill(ids, pixels, attention_mask=mask, fastv=fastv)
    got = dev.prefill(ids, pixels, attention_mask=mask, fastv=fastv)  # inputs move to the model's device
    assert got.logits.device == dev.device
    assert got.kept_image_slots() == ref.kept_image_slots()
    torch.testing.assert_close(got.logits.cpu(), ref.logits, atol=2e-4, rtol=0)
    out_cpu = cpu.generate(ids, pixels, attention_mask=mask, fastv=fastv, max_new_tokens=4)
    out_dev = dev.generate(ids, pixels, attention_mask=mask, fastv=fastv, max_new_tokens=4)
    assert out_dev.device == dev.device and torch.equal(out_dev.cpu(), out_cpu)


@torch.no_grad()
@pytest.mark.parametrize("method", [QuantConfig("int8"), QuantConfig("int4", 32)], ids=["int8", "int4"])
def test_quantized_on_device_matches_cpu_blockwise(pair, method):
    cpu, dev = pair
    q_cpu = quantize_model(copy.deepcopy(cpu), method, pack=False)  # the path every device runs
    q_dev = quantize_model(copy.deepcopy(dev), method)
    ids, mask, pixels, _ = make_batch(cpu, "heldout", range(4))
    torch.testing.assert_close(q_dev(ids, pixels, attention_mask=mask).cpu(), q_cpu(ids, pixels, attention_mask=mask),
                               atol=2e-4, rtol=0)


def test_cli_runs_on_the_device(capsys):
    from minifastv.cli import main

    for device in DEVICES:
        code = main(["generate", "--image", str(ROOT / "samples" / "heldout_0.png"), "--prompt",
                     "what colour is the triangle in row four column four?", "--device", device, "--fastv-k", "2"])
        out = capsys.readouterr()
        assert code == 0 and out.out.startswith("red") and f", {device}" in out.err, out.err
