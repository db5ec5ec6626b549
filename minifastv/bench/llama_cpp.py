"""llama.cpp on the same decoder shapes, for `bench --quant ... --peer llama.cpp` (cpu7b.py).

What CPU users run instead of minifastv is llama.cpp with a Q8_0 or Q4_0 GGUF. This writes a GGUF of the
benchmarked decoder's shape (LLaMA-7B or -13B) with random F16 weights (the `gguf` package; nothing is
downloaded), quantizes it with llama-quantize and times it with llama-bench: prompt processing at minifastv's
prompt length (632 tokens: LLaVA-1.5's prompt with one image; 2,112: Video-LLaVA's with one 8-frame video, for
which llama.cpp has no model, so the decoder alone is the anchor; 2,984: LLaVA-NeXT's with one 672 x 672 image)
and generation of a few tokens after a prompt of that length (llama-bench's --n-depth: minifastv's decode steps
attend over the prompt, so llama.cpp's do too; from an empty context, as before 2026-12-06, its decode after LLaVA-
NeXT's prompt came out faster than it is), same thread count. Peak RSS is read from a wrapper process's children,
the larger of the two llama-bench runs'.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PEER_OF = {"int8": "Q8_0", "int4": "Q4_0"}   # minifastv's quantization -> the llama.cpp type it is compared with


def find_tool(name: str, bin_dir: str | None) -> Path:
    path = Path(bin_dir) / name if bin_dir else shutil.which(name)
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"{name}: not found {'in ' + bin_dir if bin_dir else 'on PATH'}; build llama.cpp "
                                "(cmake --build build --target llama-bench llama-quantize) and pass --peer-bin")
    return Path(path)


def write_gguf(path: Path, text, log):
    """A LLaMA decoder of the shape of `text` (a TextConfig) with random F16 weights (norms 1, F32) and a stand-in
    vocabulary as large as the model's, streamed to disk."""
    try:
        import gguf
        import numpy as np
    except ImportError as e:
        raise SystemExit(f"--peer llama.cpp writes a GGUF file and needs the gguf package ({e}): "
                         'pip install -e ".[peer]"') from None

    d, ffn, heads, kv_heads, layers = text.dim, text.intermediate_size, text.n_heads, text.n_kv_heads, text.n_layers
    vocab = text.vocab_size
    kv = d // heads * kv_heads
    shapes = [("token_embd.weight", (vocab, d))]
    for i in range(layers):
        shapes += [(f"blk.{i}.attn_norm.weight", (d,)), (f"blk.{i}.attn_q.weight", (d, d)),
                   (f"blk.{i}.attn_k.weight", (kv, d)), (f"blk.{i}.attn_v.weight", (kv, d)),
                   (f"blk.{i}.attn_output.weight", (d, d)), (f"blk.{i}.ffn_norm.weight", (d,)),
                   (f"blk.{i}.ffn_gate.weight", (ffn, d)), (f"blk.{i}.ffn_up.weight", (ffn, d)),
                   (f"blk.{i}.ffn_down.weight", (d, ffn))]
    shapes += [("output_norm.weight", (d,)), ("output.weight", (vocab, d))]
    tmp = path.with_suffix(".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_context_length(4096)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(text.norm_eps)
    w.add_rope_dimension_count(d // heads)
    w.add_rope_freq_base(text.rope_theta)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                      + [gguf.TokenType.NORMAL] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    dtype = {1: np.float32, 2: np.float16}
    for name, shape in shapes:
        dt = np.dtype(dtype[len(shape)])
        w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for name, shape in shapes:
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            w.write_tensor_data((rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16))
    w.close()
    tmp.rename(path)
    log(f"wrote {path}")


class PeerError(RuntimeError):
    """A llama.cpp tool failed: its own words and exit status, in one line."""


def failure(tool: str, returncode: int, stderr: str) -> PeerError:
    """The one-line error of a tool that ended with `returncode`: its status (a signal by name) and its stderr's
    last lines."""
    status = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit status {returncode}"
    said = " | ".join(line.strip() for line in stderr.strip().splitlines()[-3:] if line.strip())
    return PeerError(f"{tool} failed ({status}){': ' + said[-400:] if said else ''}")


def run_tool(cmd: list[str]) -> str:
    """Run a llama.cpp tool; its stdout, or a PeerError."""
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        raise failure(Path(cmd[0]).name, r.returncode, r.stderr)
    return r.stdout


def peak_rss_of(cmd: list[str]) -> tuple[str, int]:
    """Run cmd in a wrapper process; its stdout and the peak RSS (bytes) of the command, or a PeerError."""
    wrapper = ("import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, "
               "text=True); print(json.dumps([r.returncode, r.stdout, r.stderr, "
               "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))")
    returncode, out, err, rss = json.loads(run_tool([sys.executable, "-c", wrapper, *cmd]))
    if returncode:
        raise failure(Path(cmd[0]).name, returncode, err)
    return out, rss


def bench_test(cmd: list[str]) -> tuple[dict, int]:
    """The one test a llama-bench command runs (its JSON record) and the command's peak RSS, or a PeerError."""
    out, rss = peak_rss_of(cmd)
    try:
        return json.loads(out)[0], rss
    except (json.JSONDecodeError, IndexError, KeyError, TypeError):
        raise PeerError(f"llama-bench printed no JSON results: {out.strip()[-200:]!r}") from None


def run_peer(workdir: Path, text, threads: int, decode_tokens: int, bin_dir: str | None, log,
             prompt: int = 632, name: str = "llama7b", types=tuple(PEER_OF.values())) -> dict:
    """llama-bench on random GGUFs of the decoder `text` (a TextConfig) quantized to each of `types`, kept in workdir
    as NAME-NNlayers-*.gguf (the F16 file only until the quantized ones are made: at 7B it is 13-15 GB of disk)."""
    bench, quantize = find_tool("llama-bench", bin_dir), find_tool("llama-quantize", bin_dir)
    workdir.mkdir(parents=True, exist_ok=True)
    files = {q: workdir / f"{name}-{text.n_layers}layers-{q}.gguf" for q in ("F16", *types)}
    f16 = files["F16"]
    if not f16.is_file() and not all(files[q].is_file() for q in types):
        write_gguf(f16, text, log)
    runs, build = {}, "?"
    for qtype in types:
        model = files[qtype]
        if not model.is_file():
            start = time.perf_counter()
            run_tool([str(quantize), str(f16), str(model), qtype, str(threads)])
            log(f"llama-quantize {qtype}: {time.perf_counter() - start:.0f} s")
        common = [str(bench), "-m", str(model), "-t", str(threads), "-r", "2", "-o", "json"]
        (pp, pp_rss), (tg, tg_rss) = (bench_test(common + test) for test in (   # the prompt; decode after it
            ["-p", str(prompt), "-n", "0"], ["-p", "0", "-n", str(decode_tokens), "-d", str(prompt)]))
        build = f"{pp.get('build_commit', '?')} (build {pp.get('build_number', '?')}), {pp.get('cpu_info', '')}"
        runs[qtype] = {"pp_tok_s": pp["avg_ts"], "pp_stddev": pp["stddev_ts"], "tg_tok_s": tg["avg_ts"],
                       "tg_stddev": tg["stddev_ts"], "peak_rss": max(pp_rss, tg_rss)}
        log(f"llama.cpp {qtype}: {json.dumps(runs[qtype])}")
    f16.unlink(missing_ok=True)
    return {"build": build, "runs": runs}
