"""`python -m minifastv serve`: an OpenAI-compatible server (POST /v1/chat/completions, GET /v1/models,
GET /health) and a web page at / that shows which image patches the model kept. Needs the [serve] extra
(Starlette and uvicorn)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path


def add_arguments(p):
    from ..options import model_arguments

    model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--api-key", help="require the header Authorization: Bearer KEY on the API")
    p.add_argument("--allow-files", type=Path,
                   help="a directory whose image and video files requests may name by path (default: none, data: URLs only)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=32,
                   help="requests that may wait for a place; more are answered 429 (default: %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="when idle, how long the first request waits for others to prefill with (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=512, help="the cap on a request's max_tokens (default: %(default)s)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="request body cap (default: %(default)s)")
    p.add_argument("--max-image-mb", type=float, default=10.0, help="cap on one image's bytes (default: %(default)s)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="cap on one image's pixels "
                   "(default: %(default)s)")
    p.add_argument("--max-images", type=int, default=4, help="images a request may carry (default: %(default)s)")
    p.add_argument("--max-video-mb", type=float, default=50.0,
                   help="cap on one video's bytes, for a video model (default: %(default)s)")
    p.add_argument("--max-video-frames", type=int, default=100_000,
                   help="cap on a video's frames; a long one is read by seeking to the sampled frames "
                        "(default: %(default)s)")
    p.add_argument("--max-videos", type=int, default=1, help="videos a request may carry (default: %(default)s)")
    p.add_argument("--shutdown-grace", type=float, default=10.0, help="seconds in-flight requests get to finish "
                   "after SIGINT/SIGTERM; then they end as if their token budget ran out (default: %(default)s)")
    p.add_argument("--step-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: slow decoding down
    p.add_argument("--served-name", help="the model's name in the API (default: the checkpoint directory's name)")


def check_arguments(args):
    def flag(name):
        return "--" + name.replace("_", "-")

    for name in ("max_batch", "max_tokens", "max_image_pixels", "max_images", "max_body_mb", "max_image_mb",
                 "max_video_mb", "max_video_frames", "max_videos"):
        if not getattr(args, name) > 0:
            raise ValueError(f"{flag(name)} must be positive, got {getattr(args, name)}")
    for name in ("max_queue", "batch_wait_ms", "shutdown_grace"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"{flag(name)} must be 0 or more, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.allow_files is not None and not args.allow_files.is_dir():
        raise ValueError(f"--allow-files {args.allow_files}: not a directory")


def cmd_serve(args):
    try:
        import uvicorn

        from .api import create_app
    except ImportError as e:
        raise ValueError(f"serve needs the [serve] extra ({e.name} is missing): pip install 'minifastv[serve]'") from None
    from ..options import check_pruning, describe, load_pipeline, pruner_from_args, pruning_asked
    from .engine import Engine
    from .protocol import Limits

    check_arguments(args)
    if args.kv_cache != "float":
        raise ValueError("serve keeps float KV caches (its batching merges and splits them); drop --kv-cache")
    method = pruner_from_args(args)
    pipe = load_pipeline(args)
    check_pruning(method, pipe.model.config, pruning_asked(args))
    limits = Limits(int(args.max_body_mb * 2**20), int(args.max_image_mb * 2**20), args.max_image_pixels,
                    args.max_images, args.max_tokens, args.allow_files, int(args.max_video_mb * 2**20),
                    args.max_videos, args.max_video_frames)
    name = args.served_name or Path(args.model).name
    engine = Engine(pipe, max_batch=args.max_batch, max_queue=args.max_queue, batch_wait=args.batch_wait_ms / 1e3,
                    step_delay=args.step_delay_ms / 1e3)
    app = create_app(engine, limits, model_name=name, default_prune=method, api_key=args.api_key)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=args.shutdown_grace + 5))
    stop = server.handle_exit

    def handle_exit(sig, frame):  # stop taking requests; the running ones get the grace period
        engine.drain(args.shutdown_grace)
        stop(sig, frame)

    server.handle_exit = handle_exit
    print(f"serving {name} on http://{args.host}:{args.port}/ (the page), http://{args.host}:{args.port}/v1 (the "
          f"API); pruning {describe(method) if method else 'none'} unless a request says otherwise; up to "
          f"{args.max_batch} requests decoded together, {args.max_queue} waiting", file=sys.stderr)
    video = getattr(pipe.model.config, "n_frames", None) is not None
    print(limits.describe(video) + ("" if args.api_key else "; no API key"), file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: --host {args.host} without --api-key: anyone who can reach this machine can use the model",
              file=sys.stderr)
    engine.start()
    # uvicorn handles SIGINT/SIGTERM while it runs and raises the signal again once it has stopped, into the
    # handler found before it: one that does nothing lets the engine stop and the process end with status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        server.run()
    finally:
        engine.drain(0)
        engine.close()
    print("server stopped", file=sys.stderr)
