"""Rebuilding a trained model from its run directory (every inference verb starts here).

    loaded = load_run("runs/food101-lora")      # recipe, task, processor, AdapterModel, labels
    loaded.model(pixel_values=...).logits

The recipe comes from the run's ``recipe.yaml``; the base model from the hub or local
folder the recipe names, or from the run's ``base_model/`` when it was built from a config.
A run that cannot be rebuilt exactly (no ``base_model/`` for a random base, no label map
for a classifier) is refused rather than rebuilt differently.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli import rundir as rd
from lora_cli.adapters import load_adapter_model
from lora_cli.devices import resolve_device
from lora_cli.errors import UserInputError
from lora_cli.hub import cached_snapshot, require_hub
from lora_cli.recipe import load_recipe
from lora_cli.task_kinds import TASK_KINDS
from lora_cli.tasks import get_task


@dataclass
class LoadedRun:
    """A run rebuilt for inference: its recipe, task, processor and adapted model."""

    run_dir: Path
    recipe: Any
    model: Any  # AdapterModel
    processor: Any
    task: Any
    id2label: dict[int, str] | None


def load_run(run_dir: str | Path, adapter_dir: str | Path | None = None, device: str | None = None, *,
             into: Any = None, adapter_name: str = "default") -> LoadedRun:
    """Rebuild the trained model of a run: base model + adapter (+ head), eval mode.

    ``into``: an adapter model already holding the same base (``loracli serve`` puts runs that
    share a base on one model): the run's adapter is loaded into it as ``adapter_name``
    instead of building another base; the caller vouches that the bases are the same."""
    run_dir = Path(run_dir)
    recipe_file = run_dir / rd.RECIPE_FILE
    if not recipe_file.is_file():
        raise UserInputError(f"{run_dir} is not a run directory (no {rd.RECIPE_FILE}); pass the folder `loracli train` wrote")
    rd.check_run_links(run_dir)  # nothing is read through a link that leaves the run
    holder = rd.RunLock(run_dir).holder()
    if holder is not None:
        warnings.warn(f"{run_dir} is being trained right now ({holder}); its adapter may change when that run ends",
                      stacklevel=2)
    adapter = adapter_folder(adapter_dir) if adapter_dir else run_dir / rd.ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        status = rd.read_status(run_dir)
        why = f" The run failed: {status.get('error')}." if status.get("state") == "failed" else ""
        raise UserInputError(
            f"no adapter in {adapter}: did the training finish? (expected adapter_config.json there).{why} "
            f"Continue it with `loracli train {run_dir / rd.RECIPE_FILE} --resume` if it has checkpoints"
        )
    recipe = load_recipe(recipe_file)
    task = get_task(recipe.task)
    base_dir = run_dir / rd.BASE_MODEL_DIR
    if not recipe.model.name_or_path and not base_dir.is_dir():
        raise UserInputError(
            f"{run_dir}: {rd.BASE_MODEL_DIR}/ is missing. The run's base model was built from model.config with random "
            "weights that only that folder holds, so the run cannot be rebuilt exactly (a new random base would "
            "give wrong predictions). Restore the folder from a copy of the run, or train again"
        )
    model_cfg = _from_the_cache(recipe.model)
    processor_dir = run_dir / rd.PROCESSOR_DIR
    with _damaged(processor_dir if processor_dir.is_dir() else None, "processor / tokenizer"):
        processor = task.load_processor(model_cfg, source=processor_dir if processor_dir.is_dir() else None)
    id2label = _run_label_map(run_dir, adapter, recipe.task)
    labels = [id2label[i] for i in sorted(id2label)] if id2label else None
    if into is not None:
        into.load_adapter(adapter, adapter_name)
        return LoadedRun(run_dir, recipe, into.eval(), processor, task, id2label)
    with _damaged(base_dir if base_dir.is_dir() else None, "base model"):
        model = task.build_model(model_cfg, labels, source=base_dir if base_dir.is_dir() else None)
    model = load_adapter_model(model, adapter, adapter_name=adapter_name)
    model.to(resolve_device(device)).eval()
    return LoadedRun(run_dir, recipe, model, processor, task, id2label)


def _from_the_cache(model_cfg):
    """The run's model section with a hub base (and tokenizer) that is in the hub cache read from
    there: a finished run loads what it was trained on without asking the Hub (no request, online
    or not). A base that is not cached stays a hub id, fetched as before."""
    changes = {}
    base = cached_snapshot(model_cfg.name_or_path, model_cfg.revision)
    if base is not None:
        changes.update(name_or_path=str(base), revision=None)
    tokenizer = cached_snapshot(model_cfg.tokenizer) if model_cfg.tokenizer != model_cfg.name_or_path else base
    if tokenizer is not None and model_cfg.tokenizer:
        changes["tokenizer"] = str(tokenizer)
    return model_cfg.model_copy(update=changes) if changes else model_cfg


def adapter_folder(adapter: str | Path) -> Path:
    """A PEFT-format adapter: a local folder, or a hub repo id (``user/repo``) fetched into the
    hub cache. Offline, a hub id that is not cached fails at once with what to do instead."""
    local = Path(adapter).expanduser()
    text = str(adapter)
    if local.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        return local
    require_hub(text, "--adapter", local_hint="Give the path of a local adapter folder (with adapter_config.json).")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(text, allow_patterns=["adapter_config.json", "*.safetensors", "*.json"]))


def _run_label_map(run_dir: Path, adapter: Path, task: str) -> dict[int, str] | None:
    id2label = rd.read_label_map(adapter) or rd.read_label_map(run_dir / rd.ADAPTER_DIR)
    if id2label is None and TASK_KINDS[task].labels:
        raise UserInputError(
            f"{adapter / rd.LABEL_MAP_FILE} is missing: a {task} run needs it to build its head and name its classes. "
            "Restore it from a copy of the run, or train again"
        )
    return id2label


@contextlib.contextmanager
def _damaged(folder: Path | None, what: str):
    """A run's own folder that transformers cannot read is bad input naming that folder."""
    try:
        yield
    except UserInputError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        if folder is None:
            raise
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserInputError(
            f"{folder}: the run's {what} cannot be read ({type(exc).__name__}: {first}); the folder is damaged. "
            "Restore it from a copy of the run, or train again"
        ) from None

