"""``loracli serve`` against what a user would run without it, under concurrent clients.

For each kind (image classification, text classification, completions), four runs on one
base (``bench.serve_runs``) are served three ways, each in its own server process(es) on
loopback, and ``--clients`` client threads send ``--requests`` requests in a closed loop,
request ``i`` for run ``i % 4``:

- **serve**: ``loracli serve`` with the four runs (one model, mixed-adapter batches,
  ``--max-batch 16 --max-wait-ms 10``);
- **per-run**: four ``bench.serve_naive`` processes, one per run, each doing one
  ``predict``-style forward (or one ``generate``) of batch 1 per request;
- **merged** (classification): the same, each process serving the run merged by
  ``loracli merge`` (plain transformers, no adapter at run time).

The same CPU budget for every case: ``loracli serve`` gets ``--threads`` torch threads
(default: the machine's cores), each of the four per-run processes ``max(1, threads // 4)``.
Every server process runs with ``OMP_WAIT_POLICY=PASSIVE``: on a machine shared with other
work, torch's OpenMP threads otherwise spin-wait against the other processes, and a forward
with 2 threads ran 3-20x slower than with 1 here. Reported per case: requests/s (wall), p50
and p99 latency (per request, client side), and for completions generated tokens/s. A
warm-up request per run precedes the timed load; multipart bodies are encoded once, before.

    .venv/bin/python -m bench.serve                       # all kinds, 16 clients
    .venv/bin/python -m bench.serve --kinds image --requests 320 --size vits
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.serve_runs import REVIEWS, photos, write_runs

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The best thing about this place is", "Tomorrow we will", "Once upon a time", "The results show that"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Servers:
    """Server processes started together, each waited for on /health, stopped by pid."""

    def __init__(self, commands: list[list[str]], threads: int, log: Path) -> None:
        self.ports = [free_port() for _ in commands]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
               "TOKENIZERS_PARALLELISM": "false"}
        self.log = log.open("ab")
        self.procs = [subprocess.Popen([sys.executable, "-m", *cmd, "--port", str(port)], cwd=REPO, env=env,
                                       stdout=subprocess.DEVNULL, stderr=self.log)
                      for cmd, port in zip(commands, self.ports)]
        for port, proc in zip(self.ports, self.procs):
            deadline = time.monotonic() + 600
            while True:
                assert proc.poll() is None, f"a server exited (see {log})"
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"a server did not start (see {log})"
                time.sleep(0.5)

    def stop(self) -> None:
        for proc in self.procs:
            os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            proc.wait(120)
        self.log.close()


def drive(send, n_requests: int, clients: int) -> dict:
    """``send(client, i) -> tokens`` from ``clients`` threads, ``n_requests`` in all."""
    latencies: list[float] = []
    tokens = [0]
    counter = iter(range(n_requests))
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                got = send(client, i)
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    tokens[0] += got

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {"requests": n_requests, "wall_s": wall, "req_per_s": n_requests / wall,
            "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "tokens_per_s": tokens[0] / wall if tokens[0] else None}


def _multipart(fields: dict, image: bytes) -> dict:
    """A multipart upload encoded once (headers and bytes), so the clients spend no time on it."""
    request = httpx.Request("POST", "http://x/", data=fields, files={"image": ("x.jpg", image, "image/jpeg")})
    return {"content": request.read(), "headers": {"content-type": request.headers["content-type"]}}


def request_for(kind: str, images: list[bytes], max_tokens: int):
    """``i -> (path, httpx kwargs)`` for serve and for the baselines."""
    uploads = {(m, k): _multipart({"model": f"image-{m}", "top_k": "1"}, img)
               for m in range(4) for k, img in enumerate(images)}
    plain = [_multipart({}, img) for img in images]

    def serve(i: int) -> tuple[str, dict]:
        model = f"{kind}-{i % 4}"
        if kind == "image":
            return "/v1/classify", uploads[i % 4, i % len(images)]
        if kind == "text":
            return "/v1/classify", {"json": {"model": model, "text": REVIEWS[i % 4], "top_k": 1}}
        return "/v1/completions", {"json": {"model": model, "prompt": PROMPTS[i % 4], "max_tokens": max_tokens, "temperature": 0}}

    def naive(i: int) -> tuple[str, dict]:
        if kind == "image":
            return "/classify", plain[i % len(images)]
        if kind == "text":
            return "/classify", {"json": {"text": REVIEWS[i % 4]}}
        return "/generate", {"json": {"prompt": PROMPTS[i % 4], "max_tokens": max_tokens}}

    return serve, naive


def tokens_of(body: dict) -> int:
    if "usage" in body:
        return body["usage"]["completion_tokens"]
    return body.get("completion_tokens", 0)


def bench_kind(kind: str, root: Path, args: argparse.Namespace) -> dict:
    runs = write_runs(root / kind, kind, size=args.size)
    images = photos(16) if kind == "image" else []
    serve_req, naive_req = request_for(kind, images, args.max_tokens)
    per_run_threads = max(1, args.threads // len(runs))
    log = root / "servers.log"
    cases = {"serve": ([["lora_cli", "serve", *map(str, runs), "--max-batch", "16", "--max-wait-ms", "10"]], args.threads),
             "per-run": ([["bench.serve_naive", "--run", str(r), "--threads", str(per_run_threads)] for r in runs],
                         per_run_threads)}
    if kind != "lm":
        from lora_cli.inference.merge import merge_from_run

        merged = [root / kind / f"merged-{r.name}" for r in runs]
        for run, out in zip(runs, merged):
            merge_from_run(run, out, n=2)
        cases["merged"] = ([["bench.serve_naive", "--merged", str(m), "--threads", str(per_run_threads)] for m in merged],
                           per_run_threads)
    results = {}
    for name, (commands, threads) in cases.items():
        servers = Servers(commands, threads, log)
        try:
            def send(client, i, servers=servers, name=name):
                if name == "serve":
                    path, kwargs = serve_req(i)
                    url = f"http://127.0.0.1:{servers.ports[0]}{path}"
                else:
                    path, kwargs = naive_req(i)
                    url = f"http://127.0.0.1:{servers.ports[i % 4]}{path}"
                response = client.post(url, **kwargs)
                response.raise_for_status()
                return tokens_of(response.json())

            for i in range(4):  # warm-up: one request per run
                with httpx.Client(timeout=600) as client:
                    send(client, i)
            results[name] = drive(send, args.requests if kind != "lm" else args.lm_requests, args.clients)
        finally:
            servers.stop()
        print(f"  {kind:5s} {name:8s} {_line(results[name])}", flush=True)
    return results


def _line(r: dict) -> str:
    tok = f", {r['tokens_per_s']:.1f} tokens/s" if r["tokens_per_s"] else ""
    return f"{r['req_per_s']:.2f} req/s, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms{tok} ({r['requests']} in {r['wall_s']:.1f} s)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="image,text,lm", help="comma-separated: image, text, lm")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=320, help="classification requests per case")
    parser.add_argument("--lm-requests", type=int, default=64, help="completion requests per case")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--size", choices=["small", "vits"], default="small", help="the image runs' ViT")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of loracli serve")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="loracli-bench-serve-"))
    print(f"{args.clients} clients, serve {args.threads} threads, per-run servers {max(1, args.threads // 4)} each; "
          f"image ViT {args.size}; work folder {root}", flush=True)
    figures = {}
    try:
        for kind in args.kinds.split(","):
            figures[kind] = bench_kind(kind, root, args)
            base = figures[kind]["per-run"]
            ours = figures[kind]["serve"]
            key = "tokens_per_s" if kind == "lm" else "req_per_s"
            print(f"  {kind:5s} serve / per-run: {ours[key] / base[key]:.2f}x {key.replace('_per_s', '/s')}, "
                  f"p99 {ours['p99_ms'] / base['p99_ms']:.2f}x", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
