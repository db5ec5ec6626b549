"""The kernel each quantized linear runs is measured on the machine (quant/kernels.py): a probe at load picks per
path and regime, the choice is cached per machine and shape, a forced slow result switches the kernel, and every
kernel a probe can pick keeps the logits within the quantization noise twin's bounds (test_quant.py)."""

import copy
import dataclasses
import json

import pytest
import torch
from helpers import assert_decode_within_noise_twin, hf_llava, random_pixels, random_prompt, to_minifastv

from minifastv import generate
from minifastv.config import LlavaConfig, QuantConfig
from minifastv.machine import SMALL_DECODER_BYTES, decoder_fp32_bytes
from minifastv.models import LlavaModel
from minifastv.quant import kernels, quantize_model, set_activations, use_kernels
from minifastv.quant.linear import CANDIDATES

INT8, INT4 = QuantConfig("int8"), QuantConfig("int4", 32)
PATHS = {"int8": INT8, "int8 + int8 activations": INT8, "int4": INT4}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test its own kernel cache (never the user's)."""
    monkeypatch.setenv("MINIFASTV_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / kernels.CACHE_FILE


@pytest.fixture(scope="module")
def medium():
    """A random float model above machine.SMALL_DECODER_BYTES (105 MB of fp32 decoder weights), so that it is
    probed."""
    tiny = LlavaConfig.from_name("tiny")
    config = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, dim=512, n_layers=8, n_heads=8,
                                                                n_kv_heads=8, intermediate_size=1408, vocab_size=1000))
    assert decoder_fp32_bytes(config.text) > SMALL_DECODER_BYTES
    torch.manual_seed(0)
    return LlavaModel(config).eval()


def quantized(model, quant, activations="float"):
    q = quantize_model(copy.deepcopy(model), quant)
    if activations == "int8":
        for _, linear in kernels.quant_linears(q):
            linear.activations = "int8"
    return q


def fake_clock(slow: set):
    """A probe clock under which the (regime, kernel) pairs in `slow` take 1 s and every other 0.1 s."""
    seen = []

    def measure(regime, kernel, run):
        run()
        seen.append((regime, kernel))
        return 1.0 if (regime, kernel) in slow else 0.1

    return measure, seen


def spy(monkeypatch) -> list:
    """Names of torch's kernels as they are called."""
    calls = []
    for name in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_int_mm"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


@pytest.mark.parametrize("path", list(PATHS))
def test_the_probe_times_every_candidate_and_the_choice_is_cached(medium, path, cache, monkeypatch):
    q = quantized(medium, PATHS[path], "int8" if "activations" in path else "float")
    choice = kernels.choose_kernels(q)
    assert choice is q.kernel_choice and choice.path == path and choice.how.startswith("probed in")
    for regime in kernels.REGIMES:
        assert list(choice.timings[regime]) == list(CANDIDATES[path][regime])
        assert all(ms > 0 for ms in choice.timings[regime].values())
        assert choice.kernels[regime] in CANDIDATES[path][regime]
    assert all(m.chosen[path] == choice.kernels for _, m in kernels.quant_linears(q))
    entry = json.loads(cache.read_text())[kernels.cache_key(q, path)]
    assert {r: entry[r] for r in kernels.REGIMES} == choice.kernels
    monkeypatch.setattr(kernels, "measure", lambda *a: pytest.fail("probed although cached"))
    again = kernels.choose_kernels(quantized(medium, PATHS[path], "int8" if "activations" in path else "float"))
    assert again.kernels == choice.kernels and again.how.startswith("cached for this machine")
    assert choice.describe().startswith(f"kernels ({path}): decode {choice.kernels['decode']}, prefill ")


def test_the_cache_is_per_machine_torch_threads_and_dtype(medium, monkeypatch):
    q = quantized(medium, INT8)
    key = kernels.cache_key(q, "int8")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert kernels.cache_key(q, "int8") != key
    finally:
        torch.set_num_threads(threads)
    for target, name, value in ((torch, "__version__", "0.0.0"), (kernels, "cpu_name", lambda: "another CPU"),
                                (torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")):
        with monkeypatch.context() as m:
            m.setattr(target, name, value)
            assert kernels.cache_key(q, "int8") != key, name
    assert kernels.cache_key(q, "int8 + int8 activations") != key
    assert kernels.cache_key(q.to(torch.bfloat16), "int8") != key


@pytest.mark.parametrize("path", list(PATHS))
def test_a_forced_slow_probe_switches_the_kernel(medium, path, monkeypatch):
    """The default of each regime made slow: the other candidate runs, at decode and prefill, and the tokens
    stay those of the default kernels (the differences between kernels are rounding)."""
    activations = "int8" if "activations" in path else "float"
    defaults = quantized(medium, PATHS[path], activations)
    ids = torch.tensor([[1] + list(range(10, 160)) + [2]])   # 152 rows: the prefill regime of int8 and int4
    want, want_logits = generate(defaults, ids, max_new_tokens=4, return_logits=True)
    q = quantized(medium, PATHS[path], activations)
    measure, seen = fake_clock({(r, CANDIDATES[path][r][0]) for r in kernels.REGIMES})
    monkeypatch.setattr(kernels, "measure", measure)
    choice = kernels.choose_kernels(q)
    assert choice.kernels == {r: CANDIDATES[path][r][1] for r in kernels.REGIMES}
    assert len(seen) == 2 * 2    # one round each: the runner-up took 10x the best
    calls = spy(monkeypatch)
    out, logits = generate(q, ids, max_new_tokens=4, return_logits=True)
    ran = {"weight_int8pack_mm": "_weight_int8pack_mm", "int_mm": "_int_mm",
           "weight_int4pack_mm": "_weight_int4pack_mm_for_cpu", "blockwise": None}
    prefill, decode = (ran[choice.kernels[r]] for r in ("prefill", "decode"))
    layers = 7 * 8   # the prefill's linears; then lm_head on the last row, and the decode steps: one row each
    assert calls == [prefill] * layers * bool(prefill) + [decode] * (1 + 3 * (layers + 1)) * bool(decode)
    assert torch.equal(out, want)
    torch.testing.assert_close(logits, want_logits, atol=0.05 * want_logits.std(), rtol=0)


def test_the_decode_probe_reaches_cold_weights_and_the_prefill_probe_each_shape(medium, monkeypatch):
    """Decode: the first layers' linears until PROBE_BYTES of weights (so that each comes back cold), all of a
    smaller model; prefill: one linear of each shape of the first layer (q, gate, down)."""
    runs = []

    def measure(regime, kernel, run):
        run()
        runs.append((regime, len(run.args[0])))   # functools.partial(run_all, linears, kernel, inputs)
        return 0.1

    monkeypatch.setattr(kernels, "measure", measure)
    q = quantized(medium, INT8)
    for probe_bytes, decode_linears in ((256 << 20, 7 * 8), (sum(map(kernels.weight_bytes, kernels.by_layer(q)[0])) + 1,
                                                           7 * 2)):
        runs.clear()
        monkeypatch.setattr(kernels, "PROBE_BYTES", probe_bytes)
        kernels.probe(q, "int8")
        assert {n for regime, n in runs if regime == "decode"} == {decode_linears}
        assert {n for regime, n in runs if regime == "prefill"} == {3}


def test_the_default_stays_unless_another_is_a_margin_faster():
    timings = {"decode": {"weight_int8pack_mm": 10.5, "blockwise": 10.0},
               "prefill": {"blockwise": 12.0, "weight_int8pack_mm": 10.0}}
    assert kernels.pick("int8", timings) == {"decode": "weight_int8pack_mm", "prefill": "weight_int8pack_mm"}
    timings["prefill"]["blockwise"] = 10.9
    assert kernels.pick("int8", timings)["prefill"] == "blockwise"


def test_close_candidates_get_every_round(medium, monkeypatch):
    measure, seen = fake_clock(set())   # all equal: no round decides early, and the defaults stay
    monkeypatch.setattr(kernels, "measure", measure)
    choice = kernels.choose_kernels(quantized(medium, INT8))
    assert len(seen) == 2 * 2 * kernels.ROUNDS and choice.kernels == kernels.default_kernels("int8")


def test_int8_activations_run_in_integers_only_where_faster(medium, monkeypatch):
    """--activations int8 on a box where the integer GEMM loses at one row: decode runs the weight-only kernel,
    prefill the integer GEMM; set_activations chooses again for the new path, and back."""
    measure, _ = fake_clock({("decode", "int_mm")})
    monkeypatch.setattr(kernels, "measure", measure)
    q = quantized(medium, INT8)
    kernels.choose_kernels(q)
    set_activations(q, "int8")
    assert q.kernel_choice.kernels == {"decode": "weight_int8pack_mm", "prefill": "int_mm"}
    calls = spy(monkeypatch)
    generate(q, torch.tensor([list(range(10, 69))]), max_new_tokens=3)
    assert set(calls[:56]) == {"_int_mm"} and set(calls[56:]) == {"_weight_int8pack_mm"}
    set_activations(q, "float")
    assert q.kernel_choice.path == "int8" and q.kernel_choice.how.startswith("cached")


def test_a_damaged_or_unwritable_cache_is_probed_again(medium, cache, monkeypatch):
    q = quantized(medium, INT8)
    cache.parent.mkdir(parents=True)
    for damage in ("{not json", json.dumps({kernels.cache_key(q, "int8"): {"decode": "fast", "prefill": "x"}}),
                   "[]"):
        cache.write_text(damage)
        assert kernels.choose_kernels(q).how.startswith("probed")
        assert kernels.cached_kernels(json.loads(cache.read_text())[kernels.cache_key(q, "int8")], "int8")
    entries = json.loads(cache.read_text())
    entries[kernels.cache_key(q, "int8")]["timings"] = {"decode": "fast"}   # kernels fine, timings damaged
    cache.write_text(json.dumps(entries))
    choice = kernels.choose_kernels(q)
    assert choice.how.startswith("cached") and choice.timings is None and "ms per probe pass" not in choice.describe()
    monkeypatch.setenv("MINIFASTV_CACHE", str(cache))          # a file where the directory should be
    choice = kernels.choose_kernels(q)
    assert "not cached" in choice.how and choice.kernels["decode"] in CANDIDATES["int8"]["decode"]


def test_small_models_and_unpacked_int4_keep_what_they_can_run(monkeypatch):
    monkeypatch.setattr(kernels, "measure", lambda *a: pytest.fail("a small model was probed"))
    small = quantize_model(to_minifastv(hf_llava()), INT8)
    choice = kernels.choose_kernels(small)
    assert choice.kernels == kernels.default_kernels("int8") and "a small model" in choice.how
    stored = quantize_model(to_minifastv(hf_llava()), INT4, pack=False)
    choice = kernels.choose_kernels(stored)
    assert choice.kernels == {"decode": "blockwise", "prefill": "blockwise"} and "layout" in choice.how
    assert kernels.choose_kernels(to_minifastv(hf_llava())) is None


def test_use_kernels_refuses_a_kernel_the_path_has_not():
    q = quantize_model(to_minifastv(hf_llava()), INT4)
    with pytest.raises(ValueError, match="'int_mm' is not a decode kernel of int4; choose one of weight_int4pack_mm, "
                                         "blockwise"):
        use_kernels(q, {"decode": "int_mm", "prefill": "blockwise"})


@torch.no_grad()
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("choice", range(4), ids=lambda i: ["defaults", "other decode", "other prefill", "others"][i])
def test_every_kernel_choice_stays_within_the_noise_twin(path, choice):
    """The prefill's logits and those of 5 decode steps through the cache, against fp32 recomputed from scratch,
    stay within 1.3x the noise twin's mean error and 2x its max (test_quant.py's bound) whichever kernels run."""
    fp32 = to_minifastv(hf_llava(n_kv_heads=2, seed=1))
    quant = PATHS[path]
    q = quantize_model(copy.deepcopy(fp32), quant)
    if "activations" in path:
        set_activations(q, "int8")
    use_kernels(q, {r: CANDIDATES[path][r][choice >> i & 1] for i, r in enumerate(kernels.REGIMES)})
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(2), 20, [4])])   # 35 rows: prefill for int8
    px = random_pixels(1)
    if quant.method == "int4":   # int4's decode regime reaches 128 rows: a longer prompt
        ids = torch.tensor([random_prompt(torch.Generator().manual_seed(2), 130, [4])])
    assert_decode_within_noise_twin(fp32, q, ids, px, 5, activations="activations" in path)
