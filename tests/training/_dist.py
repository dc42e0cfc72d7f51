"""Shared by the multi-process tests: launching 2 CPU processes (gloo) and comparing adapters."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import TINY_VIT

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PER_DEVICE = 4  # 24 training images: 3 steps of 2 x 4 make one epoch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg", **(extra or {}))
    return env


def launch(cmd: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env(extra_env), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done


def torchrun(nproc: int, *args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), *args]


def recipe_file(folder: Path, data: Path, adapter: dict, max_steps: int) -> Path:
    recipe = {
        "name": "dist", "task": "image-classification", "seed": 7, "output_dir": str(folder / "run"),
        "model": {"config": TINY_VIT, "processor": {"size": {"height": 32, "width": 32}}},
        "data": {"imagefolder": str(data), "augment": False},
        "adapter": adapter,
        "training": {
            "learning_rate": 1e-2, "max_steps": max_steps, "per_device_train_batch_size": PER_DEVICE,
            "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no",
        },
    }
    path = folder / "recipe.yaml"
    path.write_text(json.dumps(recipe), encoding="utf-8")  # JSON is YAML
    return path


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)
