"""Load on `python -m minifastv serve` with the shipped tiny model: requests/s and p50/p95 latency at 1, 4 and
16 concurrent clients, with batching (--max-batch 16) and one request at a time (--max-batch 1), side by side
in one run. Each request: one of the sample images and its question, 32 generated tokens (ignore_eos, so
every answer has the same length), greedy.

    python benchmarks/serve_load.py [--clients 1 4 16] [--requests 32] [--tokens 32] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from serving import SAMPLE, Server, image_message  # noqa: E402

from minifastv.bench.machine import describe  # noqa: E402
from minifastv.data import SAMPLES  # noqa: E402


def load(server: Server, clients: int, requests: int, tokens: int) -> tuple[float, float, float]:
    """(requests/s, p50 s, p95 s) of `requests` requests sent by `clients` clients, each waiting for its answer
    before it sends the next."""
    def one(i):
        s = SAMPLE[i % len(SAMPLE)]
        body = {"messages": [image_message(SAMPLES / s["image"], s["question"])], "temperature": 0,
                "max_tokens": tokens, "ignore_eos": True}
        start = time.perf_counter()
        status, _, reply = server.request("POST", "/v1/chat/completions", body, timeout=600)
        assert status == 200 and reply["usage"]["completion_tokens"] == tokens, reply
        return time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        latencies = sorted(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
    return requests / wall, statistics.median(latencies), latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per measurement (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=32, help="tokens per answer (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="measurements per cell (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="the server's torch threads (default: %(default)s)")
    args = p.parse_args()
    print(describe(args.threads))
    print(f"tiny model, float32; {args.requests} requests of {args.tokens} tokens per measurement, "
          f"{args.repeats} measurements per cell (first/second shown where they differ)")
    modes = {"batched (--max-batch 16)": "16", "one at a time (--max-batch 1)": "1"}
    results = {}
    for mode, batch in modes.items():
        server = Server("--max-batch", batch, "--max-queue", "64", "--threads", str(args.threads))
        try:
            load(server, 1, 2, args.tokens)                          # warm-up
            for clients in args.clients:
                results[mode, clients] = [load(server, clients, args.requests, args.tokens)
                                          for _ in range(args.repeats)]
        finally:
            server.stop()
    print("\n| clients | serving | requests/s | p50 latency | p95 latency |\n|---|---|---|---|---|")
    for clients in args.clients:
        for mode in modes:
            runs = results[mode, clients]
            cells = [" / ".join(dict.fromkeys(fmt.format(r[k]) for r in runs)) for k, fmt in
                     ((0, "{:.1f}"), (1, "{:.2f} s"), (2, "{:.2f} s"))]
            print(f"| {clients} | {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
