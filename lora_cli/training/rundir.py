"""The run directory: what `train` writes and every later verb reads.

    runs/<name>/
      recipe.yaml      the fully resolved recipe
      adapter/         adapter_config.json + adapter_model.safetensors (PEFT), label_map.json
      processor/       image processor or tokenizer
      base_model/      only for models built from model.config (random weights nobody can re-download)
      checkpoints/     Trainer checkpoints for --resume
      metrics.jsonl    one JSON object per log/eval event
      eval.json        final evaluation
      plots/           loss / accuracy curves, confusion matrix
      env.json         versions, seed, git commit
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.errors import UserInputError

logger = logging.getLogger(__name__)

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
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_label_map(directory: Path, id2label: dict[int, str]) -> None:
    write_json(directory / LABEL_MAP_FILE, {"id2label": {str(k): v for k, v in id2label.items()},
                                             "label2id": {v: k for k, v in id2label.items()}})


def read_label_map(directory: Path) -> dict[int, str] | None:
    path = directory / LABEL_MAP_FILE
    if not path.is_file():
        return None
    return {int(k): v for k, v in json.loads(path.read_text(encoding="utf-8"))["id2label"].items()}


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return None
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


@dataclass
class LoadedRun:
    run_dir: Path
    recipe: Any
    model: Any  # AdapterModel
    processor: Any
    task: Any
    id2label: dict[int, str] | None


def load_run(run_dir: str | Path, adapter_dir: str | Path | None = None, device: str | None = None) -> LoadedRun:
    """Rebuild the trained model of a run: base model + adapter (+ head), eval mode."""
    import torch

    from lora_cli.adapters import AdapterModel
    from lora_cli.recipe import load_recipe
    from lora_cli.tasks import get_task

    run_dir = Path(run_dir)
    recipe_file = run_dir / RECIPE_FILE
    if not recipe_file.is_file():
        raise UserInputError(f"{run_dir} is not a run directory (no {RECIPE_FILE}); pass the folder `loracli train` wrote")
    adapter = Path(adapter_dir) if adapter_dir else run_dir / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise UserInputError(f"no adapter in {adapter}: did the training finish? (expected adapter_config.json there)")
    recipe = load_recipe(recipe_file)
    task = get_task(recipe.task)
    processor_dir = run_dir / PROCESSOR_DIR
    processor = task.load_processor(recipe, source=processor_dir if processor_dir.is_dir() else None)
    id2label = read_label_map(adapter) or read_label_map(run_dir / ADAPTER_DIR)
    labels = [id2label[i] for i in sorted(id2label)] if id2label else None
    base_dir = run_dir / BASE_MODEL_DIR
    model = task.build_model(recipe, labels, source=base_dir if base_dir.is_dir() else None)
    model = AdapterModel.from_pretrained(model, adapter)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return LoadedRun(run_dir, recipe, model, processor, task, id2label)
