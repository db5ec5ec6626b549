"""The int4 packed file (minifastv/int4cpu.py): written by `pack-cpu`, mapped by `load` instead of repacking when it
is fresh, ignored with a warning when the weights changed, an error when its tensors do not fit the model."""

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import minifastv
import minifastv.checkpoint as checkpoint
import minifastv.quant.linear as quant
from minifastv.checkpoint import empty_model, load_config, quantize_checkpoint
from minifastv.cli import main
from minifastv.config import QuantConfig
from minifastv.data import TINY_MODEL as TINY
from minifastv.quant.int4cpu import fingerprint, layout_file, read_cpu_layout, write_cpu_layout

pytestmark = pytest.mark.skipif(quant.cpu_int4_block() is None, reason="torch's CPU int4 layout is not the known one")
IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])


@pytest.fixture()
def int4(tmp_path):
    return quantize_checkpoint(TINY, tmp_path / "int4", QuantConfig("int4", 32), log=lambda _: None)


def packed_linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, quant.Int4Linear) and m.packed_for_cpu}


@torch.no_grad()
def test_a_packed_file_is_mapped_instead_of_repacking(int4, monkeypatch, capsys):
    repacked = minifastv.load(int4)
    assert main(["pack-cpu", str(int4)]) == 0
    file = layout_file(int4, quant.cpu_int4_block())
    assert str(file) in capsys.readouterr().out
    monkeypatch.setattr(quant, "repack_for_cpu", lambda *a: pytest.fail("repacked although the packed file is fresh"))
    read = []
    real_read = checkpoint.read_into_memory
    monkeypatch.setattr(checkpoint, "read_into_memory", lambda *a: read.append(a[-1]) or real_read(*a))
    mapped = minifastv.load(int4)
    linears = packed_linears(mapped)
    assert linears.keys() == packed_linears(repacked).keys() and linears  # the tiny model's 128-wide linears
    assert not {f"{name}.weight" for name in linears} & set(read)         # their stored form was not even read
    stored = load_file(file)
    for name, m in linears.items():
        assert not hasattr(m, "weight")                                   # the stored form was dropped
        assert torch.equal(m.packed_for_cpu[0], stored[f"{name}.packed"])
        assert torch.equal(m.packed_for_cpu[1], packed_linears(repacked)[name].packed_for_cpu[1])
    torch.testing.assert_close(mapped(IDS), repacked(IDS), rtol=0, atol=0)
    want = repacked.state_dict()                                          # saving gives the stored form back
    assert all(torch.equal(t, want[k]) for k, t in mapped.state_dict().items())


def test_a_stale_packed_file_is_ignored_with_a_warning(int4, monkeypatch):
    write_cpu_layout(int4, minifastv.load(int4))
    os.utime(int4 / "model.safetensors", ns=(0, 0))                       # the weights "changed" since
    with pytest.warns(UserWarning, match=r"cpu-int4-b\d+.safetensors: written for other weight files.*pack-cpu"):
        assert read_cpu_layout(int4, empty_model(load_config(int4))) is None
    calls = []
    real = quant.repack_for_cpu
    monkeypatch.setattr(quant, "repack_for_cpu", lambda *a: calls.append(1) or real(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minifastv.load(int4)
    assert calls                                                          # repacked from the stored form


@pytest.mark.parametrize("damage, message", [
    (lambda t, name: t.pop(name), "do not match the model: .*layers.0.attn.q_proj.packed"),
    (lambda t, name: t.__setitem__(name, t[name][:64]), r"q_proj.packed has shape \[64, 64\]"),
    (lambda t, name: t.__setitem__("llm.layers.9.attn.q_proj.packed", t[name].clone()),   # a deeper model's: one too many
     "do not match the model: .*layers.9.attn.q_proj.packed"),
])
def test_a_packed_file_that_does_not_fit_names_file_and_key(int4, damage, message):
    file = write_cpu_layout(int4, minifastv.load(int4))
    tensors = load_file(file)
    damage(tensors, "llm.layers.0.attn.q_proj.packed")
    metadata = {"block": str(quant.cpu_int4_block()), "checkpoint": fingerprint(int4)}
    save_file(tensors, file, metadata=metadata)
    with pytest.raises(minifastv.CheckpointError, match=f"cpu-int4-b\\d+.safetensors: .*{message}"):
        minifastv.load(int4)


def test_pack_cpu_refuses_what_it_cannot_pack(tmp_path, capsys):
    int8 = quantize_checkpoint(TINY, tmp_path / "int8", QuantConfig("int8"), log=lambda _: None)
    assert main(["pack-cpu", str(int8)]) == 2
    assert "not an int4 checkpoint" in capsys.readouterr().err
    assert not list(int8.glob("cpu-int4-*"))
