"""Every method at every budget over a list of lmms-eval tasks, one lmms-eval run each (with accelerate across
processes), then one table and one accuracy-against-FLOPs plot per task from the runs' result files.

    python -m minifastv.eval sweep --model DIR --tasks gqa,pope --methods fastv,dart --kept 64 128 192 \\
        --processes 8 --out results/sweep

A run lives in OUT/<method>-<kept> (OUT/none for the unpruned model) and holds lmms-eval's results, its logged
samples and minifastv's stats.json; a run whose directory already has both is skipped, so a sweep that was
stopped goes on where it was. The budgets are checked against the model before anything runs; a run in which a
request failed (lmms-eval itself exits 0 then) ends the sweep with exit 1, its stats.json kept as
stats.failed.json so that the next sweep runs it again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from ..checkpoint import load_config
from ..data import TINY_MODEL
from ..image import tokens_per_image
from ..pruning import METHODS
from . import TASKS
from .settings import pruner


def runs(methods: list[str], kept: list[int], baseline: bool = True) -> list[tuple[str, int | None]]:
    """(method, kept tokens) of each run; ("none", None) is the unpruned model."""
    return ([("none", None)] if baseline else []) + [(m, k) for m in methods for k in kept]


def run_name(method: str, kept: int | None) -> str:
    return "none" if method == "none" else f"{method}-{kept}"


def default_budgets(n_patches: int) -> list[int]:
    """The literature's budgets, 64, 128 and 192 of LLaVA-1.5's 576 image tokens, as the same shares of the
    model's own: 7, 14 and 21 of the tiny model's 64."""
    return [max(1, round(n_patches * share / 9)) for share in (1, 2, 3)]


def check_budgets(n: int, methods: list[str], kept: list[int], prune_k: int | None) -> None:
    """Every (method, budget) is one a model whose images have n tokens can run: a ValueError naming the first that
    is not."""
    for k in kept:
        if not 0 < k < n:
            raise ValueError(f"--kept {k}: the model's images have {n} tokens; a budget is 1..{n - 1}")
    for method in methods:
        with_k = prune_k if "k" in {f.name for f in fields(METHODS[method])} else None
        for k in kept:
            try:
                pruner(method, None, k, with_k, None, n)
            except ValueError as e:
                raise ValueError(f"{method} keeping {k} of {n}: {e}") from None


def run_failures(run: Path) -> str | None:
    """What went wrong in a finished lmms-eval run, or None: no stats file, or requests that failed (lmms-eval
    logs a model's error and exits 0)."""
    stats = run / "stats.json"
    if not stats.is_file():
        return "it wrote no stats.json"
    data = json.loads(stats.read_text())
    failed = [r for r in data["requests"] if "error" in r]
    if not failed:
        return None
    stats.replace(run / "stats.failed.json")
    return (f"{len(failed)} of {len(data['requests'])} requests failed, the first (task {failed[0]['task']}, "
            f"document {failed[0]['doc_id']}): {failed[0]['error']}")


def result_file(run: Path) -> Path | None:
    """The newest lmms-eval results file of a run directory, or None."""
    found = sorted(run.rglob("*_results.json"))
    return found[-1] if found else None


def is_done(run: Path) -> bool:
    return (run / "stats.json").is_file() and result_file(run) is not None


def command(args, method: str, kept: int | None, run: Path) -> list[str]:
    """The lmms-eval command line of one run: accelerate launch for several processes (on CPUs, too: it
    starts them with torch's launcher and gloo), plain python -m lmms_eval for one."""
    model_args = [f"pretrained={args.model}", f"dtype={args.dtype}", f"stats={run / 'stats.json'}"]
    if method != "none":
        model_args += [f"prune={method}", f"prune_kept={kept}"]
        if args.prune_k is not None and "k" in {f.name for f in fields(METHODS[method])}:
            model_args.append(f"prune_k={args.prune_k}")  # only to the methods that prune after a layer
    launcher = [sys.executable, "-m", "lmms_eval"]
    if args.processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                    str(args.processes), "-m", "lmms_eval"]
    cmd = launcher + ["--model", "minifastv", "--model_args", ",".join(model_args), "--tasks", args.tasks,
                      "--include_path", args.include_path, "--batch_size", str(args.batch_size), "--output_path", str(run),
                      "--log_samples"]
    if args.limit is not None:
        cmd += ["--limit", str(args.limit)]
    return cmd


def task_scores(results: dict, metrics: dict[str, str]) -> dict[str, tuple[str, float]]:
    """(metric, value) per task of an lmms-eval results file: the metric named in `metrics`, else the task's
    first (its metric_list's first)."""
    out = {}
    for task, values in results["results"].items():
        names = [k.split(",")[0] for k, v in values.items()
                 if "," in k and "_stderr" not in k and isinstance(v, (int, float))]
        if not names:
            continue
        name = metrics.get(task, names[0])
        if name not in names:
            raise ValueError(f"task {task} has no metric {name!r}; it has {', '.join(names)}")
        out[task] = (name, float(next(v for k, v in values.items() if k.split(",")[0] == name)))
    return out


def collect(out: Path, plan: list[tuple[str, int | None]], metrics: dict[str, str]) -> list[dict]:
    """One row per run and task: the score and what the model did (stats.json)."""
    rows = []
    for method, kept in plan:
        run = out / run_name(method, kept)
        if not is_done(run):
            continue
        scores = task_scores(json.loads(result_file(run).read_text()), metrics)
        stats = json.loads((run / "stats.json").read_text())["tasks"]
        for task, (metric, value) in scores.items():
            s = stats.get(task, {})
            rows.append({"method": method, "kept": kept, "task": task, "metric": metric, "score": value,
                         "kept_image_tokens": s.get("kept_image_tokens"), "image_tokens": s.get("image_tokens"),
                         "relative_prefill_flops": s.get("relative_prefill_flops"), "failed": s.get("failed"),
                         "prefill_s": s.get("prefill_s"), "decode_s": s.get("decode_s")})
    return rows


def table(rows: list[dict]) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    def ms(seconds):  # per request; a batch's time is shared among its requests
        return "-" if seconds is None else f"{seconds * 1e3:.2f}"

    lines = ["| task | metric | method | kept tokens | score | relative prefill FLOPs | image tokens kept (mean) | "
             "failed | prefill ms | decode ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["method"] != "none", r["method"], -(r["kept"] or 0))):
        lines.append(f"| {r['task']} | {r['metric']} | {r['method']} | {'all' if r['kept'] is None else r['kept']} | "
                     f"{num(r['score'], '.4g')} | {num(r['relative_prefill_flops'], '.1%')} | "
                     f"{num(r['kept_image_tokens'], '.1f')} | {num(r['failed'], 'd')} | {ms(r['prefill_s'])} | "
                     f"{ms(r['decode_s'])} |")
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], out: Path) -> list[Path]:
    """accuracy_<task>.png: the score against relative prefill FLOPs, a line per method from the unpruned point."""
    from ..plot import line_plot

    written = []
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task and r["relative_prefill_flops"] is not None]
        full = [(r["relative_prefill_flops"], r["score"]) for r in mine if r["method"] == "none"]
        series = {}
        for r in mine:
            if r["method"] != "none":
                series.setdefault(r["method"], list(full)).append((r["relative_prefill_flops"], r["score"]))
        if not series and full:
            series["none"] = full
        if series:
            written.append(line_plot(series, out / f"accuracy_{task}.png", xlabel="relative prefill FLOPs",
                                     ylabel=f"{task}: {mine[0]['metric']}", xlim=(0.0, 1.0)))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minifastv.eval sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(TINY_MODEL), help="minifastv checkpoint (default: the shipped tiny model)")
    p.add_argument("--tasks", default="minifastv_shapes", help="lmms-eval tasks, comma-separated (default: %(default)s)")
    p.add_argument("--methods", default="fastv", help="pruning methods, comma-separated (default: %(default)s)")
    p.add_argument("--kept", type=int, nargs="+",
                   help="image tokens kept per image (default: 64, 128 and 192 for LLaVA-1.5's 576, the same shares "
                        "of another model's: 7, 14, 21 of the tiny model's 64)")
    p.add_argument("--prune-k", type=int, help="the layer methods prune after, where they have one (default theirs)")
    p.add_argument("--no-baseline", action="store_true", help="skip the unpruned run")
    p.add_argument("--processes", type=int, default=1, help="processes (GPUs where there are) (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--dtype", default="auto", help="(default: %(default)s)")
    p.add_argument("--limit", type=float, help="documents per task (for trials; lmms-eval's --limit)")
    p.add_argument("--include-path", default=str(TASKS), help="the task directory lmms-eval adds to its own "
                   "tasks (it takes one; default: minifastv's, with minifastv_shapes)")
    p.add_argument("--metric", action="append", default=[], metavar="TASK=METRIC",
                   help="the metric a task is tabled by (default: its first)")
    p.add_argument("--out", default="results/sweep", help="(default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    args = p.parse_args(argv)
    try:
        metrics = dict(m.split("=", 1) for m in args.metric)
    except ValueError:
        p.error("--metric takes TASK=METRIC")
    if args.processes < 1 or args.batch_size < 1:
        p.error("--processes and --batch-size must be at least 1")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    config = load_config(args.model)
    if getattr(config, "placeholder_per_token", False):
        p.error(f"{args.model}: the sweep keeps a count of tokens per image (--kept), and this model's images have as "
                "many tokens as their size gives them (LLaVA-NeXT); run lmms-eval with prune_ratio instead")
    n_patches = tokens_per_image(config)
    kept = args.kept or default_budgets(n_patches)
    try:
        check_budgets(n_patches, methods, kept, args.prune_k)
    except ValueError as e:
        p.error(str(e))
    out = Path(args.out)
    plan = runs(methods, kept, not args.no_baseline)
    for method, kept in plan:
        run = out / run_name(method, kept)
        cmd = command(args, method, kept, run)
        if args.dry_run:
            print(" ".join(cmd))
            continue
        if is_done(run):
            print(f"{run}: done, skipped", file=sys.stderr)
            continue
        print(f"{run}: running", file=sys.stderr, flush=True)
        failure = "lmms-eval exited with an error (its output is above)" if subprocess.run(cmd).returncode else \
            run_failures(run)
        if failure:
            print(f"error: the run {run} failed: {failure}; the runs done before it stay", file=sys.stderr)
            return 1
    if args.dry_run:
        return 0
    rows = collect(out, plan, metrics)
    text = table(rows)
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text, end="")
    for picture in plots(rows, out):
        print(f"wrote {picture}", file=sys.stderr)
    print(f"wrote {out / 'table.md'} and {out / 'table.json'}", file=sys.stderr)
    return 0
