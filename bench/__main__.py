"""``python -m bench``: every benchmark, figures as ratios (see bench/README.md)."""

from __future__ import annotations

import argparse
import json
import platform

import torch

from bench.step import METHOD_KWARGS, bench_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per case (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--methods", default="lora,loha,lokr", help="comma-separated (default lora,loha,lokr)")
    parser.add_argument(
        "--dropout0", action="store_true", help="also time loha/lokr with module_dropout=0 (steadier figures)"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    results = {}
    for method in args.methods.split(","):
        method = method.strip()
        if method not in METHOD_KWARGS:
            parser.error(f"unknown method {method!r}; choose from {', '.join(METHOD_KWARGS)}")
        results[method] = bench_step(method, args.rounds, args.warmup)
        if method in ("loha", "lokr") and args.dropout0 and results[method] is not None:
            results[f"{method} module_dropout=0"] = bench_step(method, args.rounds, args.warmup, module_dropout=0.0)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
