"""Names inside a run directory, and the small JSON files every verb reads: the
environment record, the label map and the run's status."""

from __future__ import annotations

import contextlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lora_cli.atomic import write_text
from lora_cli.errors import UserInputError

RECIPE_FILE = "recipe.yaml"
ADAPTER_DIR = "adapter"
PROCESSOR_DIR = "processor"
BASE_MODEL_DIR = "base_model"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
PLOTS_DIR = "plots"
ENV_FILE = "env.json"
LABEL_MAP_FILE = "label_map.json"
STATUS_FILE = "status.json"
INIT_STATE_FILE = "init_state.safetensors"
"""How the adapter's init rewrote base weights (PiSSA/OLoRA factors, LoftQ weights), so that
--resume rebuilds the same base without running the init again (optional)."""
LOCK_FILE = ".loracli.lock"
CHECKPOINT_PREFIX = "checkpoint-"
RUN_ENTRIES = frozenset({RECIPE_FILE, ADAPTER_DIR, PROCESSOR_DIR, BASE_MODEL_DIR, CHECKPOINTS_DIR, METRICS_FILE,
                         EVAL_FILE, PLOTS_DIR, ENV_FILE, STATUS_FILE, INIT_STATE_FILE, "train.json", "logs",
                         "calibration.json", "calibration.safetensors"})
"""What ``train`` writes at the top of a run: no verb writes its output over or inside one of these."""
STAGING_DIR = ".incomplete"
"""Checkpoints are written in ``checkpoints/.incomplete/checkpoint-N`` and renamed into
``checkpoints/`` once every file is on disk."""


def environment(seed: int) -> dict[str, Any]:
    import torch
    import transformers

    from lora_cli import __version__

    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip() or None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "loracli": __version__,
        "seed": seed,
        "git_commit": commit,
        "cuda": torch.cuda.is_available(),
        "argv": sys.argv,
    }


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def save_label_map(directory: Path, id2label: dict[int, str]) -> None:
    write_json(directory / LABEL_MAP_FILE, {"id2label": {str(k): v for k, v in id2label.items()},
                                             "label2id": {v: k for k, v in id2label.items()}})


def read_label_map(directory: Path) -> dict[int, str] | None:
    """The id -> label map saved in ``directory``; None when there is none.

    A file that is there but unreadable is an error naming it, never a silent None."""
    path = directory / LABEL_MAP_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        mapping = {int(k): str(v) for k, v in data["id2label"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise UserInputError(
            f"{path} is not a valid label map ({type(exc).__name__}: {exc}); expected "
            '{"id2label": {"0": "class", ...}}. Restore it from a copy of the run, or train again'
        ) from None
    if sorted(mapping) != list(range(len(mapping))):
        raise UserInputError(f"{path}: the class ids must be 0..{len(mapping) - 1}; restore the file or train again")
    return mapping



def read_status(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / STATUS_FILE).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def write_status(run_dir: Path, state: str, **fields: Any) -> None:
    data = {**read_status(run_dir), "state": state, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
    write_json(run_dir / STATUS_FILE, data)
