"""``python -m bench.startup``: how much CPU a command spends before it answers.

Each case is a fresh ``python`` process; its cost is the CPU time (user + system, from
``resource.getrusage(RUSAGE_CHILDREN)``) it used, not wall time, so other load on the machine
moves the figures less. The cases run interleaved (a, b, c, a, b, c, ...) for ``--rounds``
rounds; figures are medians, shown in CPU-seconds and as ratios to ``python -c pass`` of the
same run. Targets (issue 24): a bad recipe reported by ``validate`` and by ``train`` in at most
1 CPU-s, a good recipe validated in at most 2 CPU-s.

The bad recipe is the quickstart recipe with a misspelt adapter key (``lora_alhpa``) and a
data folder that does not exist: both are the user's input, so the command must exit 2.
``--root`` measures another checkout (e.g. a ``git worktree`` of an older commit).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TARGETS = {"validate bad": 1.0, "train bad": 1.0, "validate good": 2.0}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _bad_recipe(root: Path, folder: Path) -> Path:
    text = (root / "recipes" / "quickstart.yaml").read_text()
    for old, new in (("lora_alpha:", "lora_alhpa:"), ("builtin: digits", f"imagefolder: {folder / 'no-such-photos'}")):
        if old not in text:
            raise SystemExit(f"recipes/quickstart.yaml no longer has {old!r}: update bench/startup.py")
        text = text.replace(old, new, 1)
    path = folder / "bad.yaml"
    path.write_text(text)
    return path


def cases(root: Path, folder: Path) -> dict[str, tuple[list[str], int]]:
    """{name: (argv, expected exit code)}."""
    cli = [sys.executable, "-m", "lora_cli"]
    good = str(root / "recipes" / "quickstart.yaml")
    bad = str(_bad_recipe(root, folder))
    out = f"output_dir={folder / 'run'}"
    return {
        "python -c pass": ([sys.executable, "-c", "pass"], 0),
        "loracli --help": ([*cli, "--help"], 0),
        "validate good": ([*cli, "validate", good, out], 0),
        "validate bad": ([*cli, "validate", bad, out], 2),
        "train bad": ([*cli, "train", bad, out], 2),
    }


def run_case(argv: list[str], expected: int, root: Path, env: dict[str, str]) -> float:
    before = _cpu_seconds()
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
    spent = _cpu_seconds() - before
    if done.returncode != expected:
        raise SystemExit(f"{' '.join(argv[1:])} exited {done.returncode}, not {expected}:\n{done.stderr[-2000:]}")
    return spent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per case (default 5)")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout whose lora_cli is measured (default: this one)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        table = cases(root, Path(tmp))
        for command, code in table.values():  # one untimed round: disk caches, .pyc files
            run_case(command, code, root, env)
        spent: dict[str, list[float]] = {name: [] for name in table}
        for _ in range(args.rounds):
            for name, (command, code) in table.items():
                spent[name].append(run_case(command, code, root, env))
    medians = {name: statistics.median(values) for name, values in spent.items()}
    base = medians["python -c pass"]
    print(f"{root} ({args.rounds} rounds, median CPU-s user+sys)")
    print(f"{'case':<16} {'CPU-s':>7} {'x pass':>8}  target")
    for name, value in medians.items():
        target = TARGETS.get(name)
        verdict = "" if target is None else f"<= {target:g} {'ok' if value <= target else 'MISSED'}"
        print(f"{name:<16} {value:7.2f} {value / base:8.1f}  {verdict}")


if __name__ == "__main__":
    main()
