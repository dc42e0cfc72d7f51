"""Recipe builders and a CLI runner for the `loracli train` end-to-end tests."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import TINY_VIT

# Per-method options; every method adapts query/value and trains the head in full.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "lora": {"r": 4, "lora_alpha": 8},
    "loha": {"r": 4, "alpha": 8},
    "lokr": {"r": 4, "alpha": 8},
    # 6 steps: budgeting from step 1 to 4, then the final phase fixes target_r
    "adalora": {"init_r": 4, "target_r": 2, "lora_alpha": 8, "tinit": 1, "tfinal": 2, "deltaT": 1},
}
METHODS = tuple(METHOD_OPTIONS)

TRAINING = {
    "max_steps": 4,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 12,
    "learning_rate": 1e-2,
    "logging_steps": 1,
    "save_strategy": "no",
    "eval_strategy": "no",
}


def recipe_dict(images: Path, output_dir: Path, method: str = "lora", **sections: dict[str, Any]) -> dict[str, Any]:
    """A tiny-ViT recipe on ``images``; each keyword updates that section (``adapter={...}``)."""
    recipe = {
        "name": "tiny",
        "task": "image-classification",
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {"config": dict(TINY_VIT)},
        "data": {"imagefolder": str(images), "augment": False},
        "adapter": {"method": method, "target_modules": ["query", "value"], **METHOD_OPTIONS[method]},
        "training": dict(TRAINING),
    }
    for section, values in sections.items():
        if isinstance(recipe.get(section), dict) and isinstance(values, dict):
            recipe[section].update(values)
        else:
            recipe[section] = values
    return recipe


def write_recipe(path: Path, images: Path, output_dir: Path, method: str = "lora", **sections) -> Path:
    path.write_text(yaml.safe_dump(recipe_dict(images, output_dir, method, **sections), sort_keys=False))
    return path


def loracli(monkeypatch, *args) -> int:
    """Run `loracli ARGS` in this process; return its exit code."""
    from lora_cli import cli

    monkeypatch.setattr(sys, "argv", ["loracli", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code
