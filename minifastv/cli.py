"""`python -m minifastv ...`: answer questions about images and videos with a checkpoint, with or without FastV."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from .config_checks import QUANT_METHODS
from .data import SAMPLES, TINY_MODEL, TINY_VIDEO_MODEL
from .options import (add_convert_arguments, add_output_arguments, check_pruning, describe, load_pipeline,
                      model_arguments, pruner_from_args, pruning_asked, quant_from_args, sampling_arguments,
                      sampling_from_args, shard_bytes)


def cmd_generate(args):
    method = pruner_from_args(args)
    if args.batch is not None and (args.image or args.video or args.prompt is not None):
        raise ValueError("--batch FILE takes the images, videos and prompts from the file: drop --image, --video "
                         "and --prompt")
    if args.batch is None and (not (args.image or args.video) or args.prompt is None):
        raise ValueError("generate needs --image or --video, and --prompt; or --batch FILE.jsonl")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    pipe = load_pipeline(args)
    check_pruning(method, pipe.model.config, pruning_asked(args))
    sampling = sampling_from_args(args, pipe.model.device)
    if args.batch is not None:
        from .batch import answer_file

        return answer_file(args.batch, args.batch_size, pipe, method, sampling)
    stream_text = None if args.json else (lambda t: print(t, end="", flush=True))
    r = pipe.answer(args.image or [], args.prompt, videos=args.video or [], prune=method, on_text=stream_text,
                    **sampling)
    if args.json:
        print(json.dumps(r.as_json()))
        return
    print()
    print(r.summary())


def cmd_chat(args):
    """A conversation about one image or one video: a question per line on standard input, /reset to start over.
    On a terminal: a "> " prompt, line editing and history (readline), Ctrl-C stops an answer, Ctrl-C or Ctrl-D at
    the prompt leaves."""
    from .image import load_image
    from .pipeline import Chat

    given = (args.image or []) + (args.video or [])
    if len(given) != 1:
        raise ValueError(f"chat is about one image or one video, got {len(given)} (--image, --video)")
    method = pruner_from_args(args)
    image = load_image(args.image[0]) if args.image else None  # a broken file is an error now, not after a question
    pipe = load_pipeline(args)
    check_pruning(method, pipe.model.config, pruning_asked(args))
    video = pipe.read_video(args.video[0]) if args.video else None
    chat = Chat(pipe, image, video=video, prune=method, **sampling_from_args(args, pipe.model.device))
    terminal = sys.stdin.isatty()
    if terminal:
        try:
            import readline  # noqa: F401 - input() gets line editing and history where the module exists
        except ImportError:
            pass
    print("a question per line; /reset starts over; end of input (Ctrl-D) ends", file=sys.stderr)
    failed = 0
    while True:
        try:
            question = input("> " if terminal else "").strip()
        except (EOFError, KeyboardInterrupt):
            if terminal:
                print(file=sys.stderr)
            elif failed:  # piped questions: a script learns that some failed (each said why above)
                print(f"error: {failed} question{'s' * (failed > 1)} failed", file=sys.stderr)
                return 1
            return
        if not question:
            continue
        if question == "/reset":
            chat.reset()
            print("(the conversation starts over)", file=sys.stderr)
            continue
        try:
            r = chat.ask(question, on_text=lambda t: print(t, end="", flush=True))
        except KeyboardInterrupt:  # the answer stops; its half-written turn cannot be continued
            chat.reset()
            print("\n(answer interrupted; the conversation starts over)", file=sys.stderr)
            continue
        except ValueError as e:  # a bad question ends neither the conversation nor the program
            hint = "; /reset starts a new conversation" if "context" in str(e) else ""
            print(f"error: {e}{hint}", file=sys.stderr)
            failed += 1
            continue
        print()
        print(r.summary(), file=sys.stderr)


def cmd_demo(args):
    """Each sample's question answered by the model, unpruned and pruned (FastV K=2, R=0.5 unless asked): the
    sample images with an image model, the sample videos with a video model; with the default --model, the
    images with the tiny model and the videos with the tiny video model."""
    from .pruning import FastV

    method = pruner_from_args(args, default=FastV(2, 0.5))
    models = [args.model] + ([str(TINY_VIDEO_MODEL)] if args.model == str(TINY_MODEL) else [])
    if len(models) > 1 and importlib.util.find_spec("av") is None:  # the default run shows what it can
        print("(the sample videos need PyAV, the [video] extra: pip install 'minifastv[video]')", file=sys.stderr)
        models = models[:1]
    missed = False
    for model in models:
        pipe = load_pipeline(argparse.Namespace(**{**vars(args), "model": model}))
        check_pruning(method, pipe.model.config, pruning_asked(args))
        kind = "video" if getattr(pipe.model.config, "n_frames", None) else "image"
        for s in json.loads((SAMPLES / ("video_questions.json" if kind == "video" else "questions.json")).read_text()):
            print(f"\n{s[kind]}: {s['question']}  (expected: {s['answer']})")
            images, videos = ([SAMPLES / s[kind]], []) if kind == "image" else ([], [SAMPLES / s[kind]])
            for name, m in (("unpruned", None), (describe(method), method)):
                r = pipe.answer(images, s["question"], videos=videos, prune=m, max_new_tokens=4)
                mark = "  " if r.text.strip() == s["answer"] else "x "
                missed |= mark == "x " and m is not None and model == str(TINY_MODEL) and isinstance(m, FastV)
                print(f"  {mark}{name:<18} -> {r.text:<10} {r.summary()}")
    if missed:  # a newcomer's first look at the headline method: say why, and what does better here
        print("\n(x: not the expected answer. The tiny model's layer-1 attention favours the top of the image, so "
              "FastV at K=2 keeps background there and loses answers: the README's pruning table shows it; "
              "DART keeps what answers: python -m minifastv demo --prune dart)")


def cmd_analyze(args):
    """Attention shares per layer (table + PNG), the patches a pruning method keeps (PNG and a `kept patches:`
    line, row-major indices in the first image's grid; for a video, a line per frame and the frames side by
    side), and the patches every method keeps, side by side."""
    from . import anyres
    from .analyze import (
        attention_shares,
        kept_cells_picture,
        kept_patches,
        kept_patches_and_share,
        kept_patches_picture,
        picture_grid,
    )
    from .image import load_image, model_view, token_grid
    from .pruning import METHODS, FastV, at_budget

    out = Path(args.out_dir)
    blocking = next((p for p in (out, *out.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        where = "is a file" if blocking == out else f"is under {blocking}, a file"
        raise NotADirectoryError(f"{out}: --out-dir {where}, not a directory")
    given = (args.image or []) + (args.video or [])
    if len(given) != 1:
        raise ValueError(f"analyze looks at one image or one video, got {len(given)} (--image, --video)")
    method = pruner_from_args(args, default=FastV(2, 0.5))
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args)
    check_pruning(method, pipe.model.config, pruning_asked(args))
    model, cfg = pipe.model, pipe.model.config
    if args.video:
        return analyze_video(args, pipe, method, out)
    image = load_image(args.image[0])
    batch = pipe.inputs([image], args.prompt)
    ids, pixels, visual = batch.input_ids, batch.pixel_values, batch.visual_inputs()
    print_attention_shares(attention_shares(model, ids, pixels, **visual), out)
    tiles = getattr(cfg, "tiles", None)   # LLaVA-NeXT: the picture is its base image, the first of its tokens
    view = tiles(image)[0] if tiles else model_view(image, cfg.vision.image_size, cfg.image_mode, cfg.image_mean)
    grid = token_grid(cfg)
    scale = max(1, 384 // cfg.vision.image_size)
    kept, share, on_grid = kept_patches_and_share(model, ids, pixels, method, **visual)
    picture_grid([(describe(method), kept_patches_picture(view, grid, kept, scale=scale))], columns=1).save(
        out / "kept_patches.png")
    unit = "patches" if grid == cfg.vision.grid else "tokens (a grid of resampled queries, not patches)"
    print(f"\n{describe(method)} keeps {len(kept)} of {grid * grid} {unit}" + (" of the base image" if tiles else ""))
    print("kept patches: " + ", ".join(map(str, kept)))
    written = [out / "attention_shares.png", out / "kept_patches.png"]
    if on_grid is not None:   # LLaVA-NeXT: the tile grid's kept cells, drawn on the image itself
        rows, cols = on_grid["rows"], on_grid["cols"]
        boxes = anyres.cell_boxes(image.height, image.width, cfg.vision.image_size, cfg.vision.patch_size, cfg.pinpoints)
        kept_cells_picture(image, boxes, on_grid["kept"]).save(out / "kept_tiles.png")
        written.append(out / "kept_tiles.png")
        print(f"and {len(on_grid['kept'])} of the {rows} x {cols} cells of its tiles, and the newline token of "
              f"{len(on_grid['newlines'])} of the {rows} rows")
        print("kept cells: " + ", ".join(map(str, on_grid["kept"])))
        print("kept newlines (rows): " + ", ".join(map(str, on_grid["newlines"])))
    # every method at `share`, the budget `method` kept of the image's tokens, K=2 where a method has a layer
    every, left_out = [], []
    for name in METHODS:
        try:
            k = kept_patches(model, ids, pixels, at_budget(name, share), **visual)
        except ValueError as e:   # a method this model's images cannot take (said, not drawn)
            left_out.append(f"{name} ({e})")
            continue
        every.append((f"{name} ({len(k)})", kept_patches_picture(view, grid, k, scale=scale)))
    picture_grid(every).save(out / "kept_patches_methods.png")
    if left_out:
        print("not drawn: " + "; ".join(left_out))
    print(f"wrote {', '.join(map(str, written))} and {out / 'kept_patches_methods.png'} (every method keeping "
          f"{share:.1%} of the {'image tokens' if tiles else 'patches'})")


def print_attention_shares(shares, out: Path):
    """analyze's table of attention shares per layer, and its picture."""
    from .analyze import SEGMENTS
    from .plot import line_plot

    print("share of attention, head-averaged: last prompt token | mean over instruction tokens")
    print("| layer | " + " | ".join(f"last->{s}" for s in SEGMENTS) + " | " +
          " | ".join(f"instr->{s}" for s in SEGMENTS) + " |\n|---|" + "---|" * 6)
    for i, row in enumerate(shares):
        print(f"| {i} | " + " | ".join(f"{v:.1%}" for v in row["last"] + row["instruction"]) + " |")
    series = {f"{who} -> {seg}": [(i, row[key][j]) for i, row in enumerate(shares)]
              for who, key in (("last", "last"), ("instr", "instruction")) for j, seg in enumerate(SEGMENTS)}
    line_plot(series, out / "attention_shares.png", xlabel="layer", ylabel="share of attention",
              ylim=(0.0, 1.0), percent_y=True)


def analyze_video(args, pipe, method, out: Path):
    """analyze --video: the attention shares, the frames with the patches `method` keeps (a line per frame), and
    every method that takes videos at the same budget, a row of frames each."""
    from .analyze import VIDEO_LEGEND, attention_shares, frames_picture, picture_grid
    from .image import model_view
    from .pruning import METHODS, at_budget
    from .video import read_frames

    model, cfg = pipe.model, pipe.model.config
    if getattr(cfg, "n_frames", None) is None:
        raise ValueError(f"{args.video[0]}: this model ({cfg.family}) takes no video")
    frames = read_frames(args.video[0], cfg.n_frames)
    batch = pipe.inputs([], args.prompt, [frames])
    print_attention_shares(attention_shares(model, batch.input_ids, None, video_values=batch.video_values), out)
    views = [model_view(frame, cfg.vision.image_size, "crop") for frame in frames]
    grid, size = cfg.vision.grid, cfg.vision.image_size

    def kept(m):
        a = pipe.answer([], args.prompt, videos=[batch.video_values[0]], prune=m, max_new_tokens=1)
        return a.kept_patches, a.kept_class_tokens[0], a.kept

    patches, classes, n_kept = kept(method)
    n = cfg.n_frames * (grid * grid + 1)
    picture_grid([(f"{describe(method)}: {n_kept} of {n} video tokens",
                   frames_picture(views, grid, patches, classes, max(1, 192 // size)))], columns=1,
                 legend=VIDEO_LEGEND).save(out / "kept_patches.png")
    print(f"\n{describe(method)} keeps {n_kept} of {n} video tokens ({cfg.n_frames} frames of {grid * grid} "
          "patches and a class token)")
    for f, p in enumerate(patches):
        print(f"frame {f} kept patches: " + (", ".join(map(str, p)) or "none") + ("; class token kept" if f in classes else ""))
    every, refused = [], []
    for name in METHODS:
        try:
            p, c, k = kept(at_budget(name, n_kept / n))
        except ValueError:  # the methods that rank by the tower's class-token attention take no video
            refused.append(name)
            continue
        every.append((f"{name} ({k})", frames_picture(views, grid, p, c, max(1, 96 // size))))
    picture_grid(every, columns=1, legend=VIDEO_LEGEND).save(out / "kept_patches_methods.png")
    print(f"wrote {out / 'attention_shares.png'}, {out / 'kept_patches.png'} and {out / 'kept_patches_methods.png'} "
          f"(every method keeping {n_kept / n:.1%} of the video tokens"
          + (f"; {', '.join(refused)} take no video)" if refused else ")"))


def cmd_convert(args):
    from .convert import convert

    convert(args.src, args.out, vision_tower=args.vision_tower, image_tower=args.image_tower,
            video_tower=args.video_tower, dtype=args.dtype, tokenizer=args.tokenizer,
            force=args.force, quant=quant_from_args(args.quantize, args.group_size),
            max_shard_bytes=shard_bytes(args), clip_text=args.clip_text)


def cmd_quantize(args):
    from .checkpoint import quantize_checkpoint

    quantize_checkpoint(args.src, args.out, quant_from_args(args.method, args.group_size), overwrite=args.force,
                        max_shard_bytes=shard_bytes(args))


def cmd_pack_cpu(args):
    from .checkpoint import load
    from .quant.int4cpu import write_cpu_layout

    start = time.perf_counter()
    file = write_cpu_layout(args.checkpoint, load(args.checkpoint, dtype=None))
    print(f"wrote {file} ({file.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f} s; "
          "loading on this CPU maps it instead of repacking")


def main(argv=None, *, convert_prog: str | None = None):
    """The command line; convert_prog names the convert command in its usage (convert_weights.py's own)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # its own options, --help included, belong to the benchmark
        from .bench import main as bench

        try:
            return bench(argv[1:])
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    parser = argparse.ArgumentParser(prog="python -m minifastv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer a question about one or more images or videos")
    model_arguments(g, anyres=True)
    g.add_argument("--image", action="append", help="image file (repeat for several)")
    g.add_argument("--video", action="append",
                   help="video file, for a video model (repeat for several; needs the [video] extra)")
    g.add_argument("--prompt", help="the question")
    g.add_argument("--batch", help='a JSON-lines file of {"image": FILE or [FILES], "video": FILE or [FILES], '
                                   '"prompt": TEXT} (image, video or both): one JSON line out per line in, in order')
    g.add_argument("--batch-size", type=int, default=8, help="inputs per left-padded batch (default: %(default)s)")
    sampling_arguments(g, max_new_tokens=64)
    g.add_argument("--json", action="store_true",
                   help="print one JSON object (text, token ids, kept image tokens, FLOPs, timings) instead")
    g.set_defaults(run=cmd_generate)

    c = sub.add_parser("chat", help="a conversation about one image or video: questions on standard input",
                       description=cmd_chat.__doc__.replace("\n    ", "\n") + " Each answer gets --max-new-tokens "
                       "or what is left of the model's context; piped, the command exits 1 if a question failed.")
    model_arguments(c, anyres=True)
    c.add_argument("--image", action="append", help="image file (one)")
    c.add_argument("--video", action="append", help="video file (one; for a video model)")
    sampling_arguments(c, max_new_tokens=256)
    c.set_defaults(run=cmd_chat)

    d = sub.add_parser("demo", help="the shipped tiny model on the sample images, with and without FastV")
    model_arguments(d, default_method="fastv K=2 R=0.5")
    d.set_defaults(run=cmd_demo)

    a = sub.add_parser("analyze", help="attention shares per layer and the patches FastV keeps, as tables and PNGs")
    model_arguments(a, default_method="fastv K=2 R=0.5", anyres=True)
    a.add_argument("--image", action="append", help="image file (one)")
    a.add_argument("--video", action="append", help="video file (one; for a video model)")
    a.add_argument("--prompt", required=True, help="the question")
    a.add_argument("--out-dir", default="analysis", help="where the PNG files go (default: %(default)s)")
    a.set_defaults(run=cmd_analyze)

    c = sub.add_parser("convert", help="convert a LLaVA checkpoint (1.5, NeXT, Video-LLaVA; as convert_weights.py)",
                       description="Convert a LLaVA-1.5, LLaVA-NeXT or Video-LLaVA checkpoint (original, -hf, or "
                                   "transformers' save_pretrained names; the layout is read from the files), or "
                                   "Qwen-VL-Chat's hub checkpoint (its qwen.tiktoken included), to minifastv's format. "
                                   "Original checkpoints also need their towers (--vision-tower, or --image-tower "
                                   "and --video-tower) and --tokenizer; docs/converting.md has every layout.",
                       **({"prog": convert_prog} if convert_prog else {}))
    add_convert_arguments(c)
    c.set_defaults(run=cmd_convert)

    q = sub.add_parser("quantize", help="weight-only int8/int4 copy of a minifastv checkpoint",
                       description="Write a copy of a float minifastv checkpoint whose decoder linears and lm_head "
                                   "are int8 (a scale per output channel) or int4 (a scale and zero point per group "
                                   "of inputs); the vision tower, projector, embeddings and norms stay float. "
                                   "docs/cpu.md has the accuracy and speed of each.")
    q.add_argument("src", help="float minifastv checkpoint directory")
    q.add_argument("out", help="output directory (must not exist unless --force)")
    q.add_argument("--method", choices=QUANT_METHODS, required=True,
                   help="int8: a scale per output channel; int4: a scale and zero point per group of inputs")
    add_output_arguments(q)
    q.set_defaults(run=cmd_quantize)

    p = sub.add_parser("pack-cpu", help="store an int4 checkpoint's weights in this CPU's kernel layout beside it, "
                                        "so that loading maps them instead of repacking")
    p.add_argument("checkpoint", help="int4 minifastv checkpoint directory (written into)")
    p.set_defaults(run=cmd_pack_cpu)

    from .serve import add_arguments as serve_arguments
    from .serve import cmd_serve

    s = sub.add_parser("serve", help="an OpenAI-compatible server and a web page that shows the kept patches "
                                     "(needs the [serve] extra)")
    serve_arguments(s)
    s.set_defaults(run=cmd_serve)

    sub.add_parser("bench", help="FastV and minifastv speed; --quant int8 int4: 7B on a CPU (--help for options)")

    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0  # 1: some of the work failed (generate --batch's bad lines)
    except (ValueError, OSError) as e:  # our errors name the file, key or value at fault
        print(f"error: {e}", file=sys.stderr)
        return 2
