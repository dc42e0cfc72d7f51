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
      status.json      running / failed / completed, with the error of a failed run
      .loracli.lock    held (fcntl) by the one process that trains into the folder

Safety rules every writer follows (issue 11): a folder is only ever deleted or replaced
when it is recognisably a run (``recipe.yaml`` and ``env.json``) and holds neither the
working directory nor the recipe or data that the command reads; one process at a time
trains into a run (:class:`RunLock`); checkpoints are written under a temporary name and
renamed when complete, and ``--resume`` takes the newest complete one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable
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
STATUS_FILE = "status.json"
LOCK_FILE = ".loracli.lock"
CHECKPOINT_PREFIX = "checkpoint-"
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
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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


CLASSIFICATION_TASKS = ("image-classification", "seq-cls")


def _run_label_map(run_dir: Path, adapter: Path, task: str) -> dict[int, str] | None:
    id2label = read_label_map(adapter) or read_label_map(run_dir / ADAPTER_DIR)
    if id2label is None and task in CLASSIFICATION_TASKS:
        raise UserInputError(
            f"{adapter / LABEL_MAP_FILE} is missing: a {task} run needs it to build its head and name its classes. "
            "Restore it from a copy of the run, or train again"
        )
    return id2label


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, newest (highest step) first."""
    folder = run_dir / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def latest_checkpoint(run_dir: Path, report: bool = False) -> Path | None:
    """The newest complete checkpoint; incomplete ones are skipped (with a warning when
    ``report``). A checkpoint holding pickled objects other than tensors is refused."""
    skipped: list[str] = []
    for folder in checkpoints(run_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            if report and skipped:
                warnings.warn(
                    f"--resume: skipped incomplete checkpoint(s) {'; '.join(skipped)}; resuming from {folder.name}",
                    stacklevel=2,
                )
            return folder
        skipped.append(f"{folder.name} ({problem})")
    if report and skipped:
        raise UserInputError(
            f"--resume: no complete checkpoint in {run_dir / CHECKPOINTS_DIR}: {'; '.join(skipped)}. "
            "Start the run again with --overwrite"
        )
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from (None when it can).

    Every file is opened the way --resume will read it: JSON parsed, safetensors headers
    and sizes checked, torch files loaded with ``weights_only=True`` (so a file that is
    not plain tensors is refused here, before training, and never unpickled).
    """
    import pickle

    import torch
    from safetensors import SafetensorError, safe_open
    from transformers.trainer_pt_utils import (
        safe_globals,  # allows numpy RNG arrays, as the Trainer does
    )

    state = folder / "trainer_state.json"
    try:
        if "global_step" not in json.loads(state.read_text(encoding="utf-8")):
            return "trainer_state.json has no global_step"
    except FileNotFoundError:
        return "no trainer_state.json"
    except (OSError, ValueError, RecursionError) as exc:
        return f"trainer_state.json is unreadable ({type(exc).__name__})"
    tensors = folder / "adapter_state.safetensors"
    if not tensors.is_file():
        return "no adapter_state.safetensors"
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    handle.get_slice(key)
        except (SafetensorError, OSError, ValueError) as exc:
            return f"{file.name} is truncated or corrupt ({exc})"
    for file in sorted([*folder.glob("*.pt"), *folder.glob("*.pth")]):
        try:
            with safe_globals():
                torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UserInputError(
                f"--resume: {file} holds pickled objects other than tensors and plain values; loracli refuses to "
                f"unpickle it, because loading such a file can run code. "
                "If you did not write this checkpoint, delete it; otherwise delete the checkpoint folder and resume "
                "from an earlier one"
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            return f"{file.name} is truncated or corrupt ({str(exc).splitlines()[0][:200]})"
    return None


# ------------------------------------------------------------ folder safety
def is_run_dir(path: Path) -> bool:
    """A folder `loracli train` wrote: it holds the recipe and the environment file."""
    return path.is_dir() and (path / RECIPE_FILE).is_file() and (path / ENV_FILE).is_file()


def _contains(folder: Path, other: Path) -> bool:
    """``other`` is ``folder`` or lies inside it (both resolved)."""
    try:
        other.relative_to(folder)
        return True
    except ValueError:
        return False


def holds_protected(folder: Path, protected: Iterable[str | Path | None], cwd: bool = True) -> Path | None:
    """The first protected path (working directory, recipe, data) at or inside ``folder``, else None."""
    resolved = folder.resolve()
    for item in [Path.cwd() if cwd else None, *protected]:
        if item is None:
            continue
        path = Path(item).expanduser().resolve()
        if _contains(resolved, path):
            return path
    return None


def find_run_below(folder: Path, depth: int = 3) -> Path | None:
    """A run directory at or below ``folder`` (symlinks not followed), else None."""
    if is_run_dir(folder):
        return folder
    if depth <= 0 or not folder.is_dir() or folder.is_symlink():
        return None
    try:
        children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return None
    for child in children:
        found = find_run_below(child, depth - 1)
        if found is not None:
            return found
    return None


def check_replaceable(folder: Path, what: str, protected: Iterable[str | Path | None] = ()) -> None:
    """Refuse (exit 2) to replace ``folder`` unless it is a run that holds nothing protected."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise UserInputError(f"{what}: {folder} is {'a symlink' if folder.is_symlink() else 'a file'}, not a run "
                             "directory; loracli will not replace it. Pick another output_dir")
    inside = holds_protected(folder, protected)
    if inside is not None:
        raise UserInputError(
            f"{what}: refusing to replace {folder}: it holds {inside} (the working directory, the recipe or the "
            "data this command reads). Pick an output_dir of its own, e.g. output_dir=runs/my-run"
        )
    if not is_run_dir(folder):
        raise UserInputError(
            f"{what}: refusing to replace {folder}: it is not a loracli run directory (no {RECIPE_FILE} and "
            f"{ENV_FILE}), so its files may be yours. Move them away or pick another output_dir"
        )


def clear_run_dir(run_dir: Path, keep: Iterable[str] = (LOCK_FILE,)) -> None:
    """Delete the contents of a run directory (checked with :func:`check_replaceable`)."""
    keep = set(keep)
    for child in run_dir.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# --------------------------------------------------------------- status, lock
def read_status(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / STATUS_FILE).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def write_status(run_dir: Path, state: str, **fields: Any) -> None:
    data = {**read_status(run_dir), "state": state, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
    write_json(run_dir / STATUS_FILE, data)


class RunLock:
    """An exclusive ``fcntl`` lock on ``run_dir/.loracli.lock``, held while one process trains.

    The kernel releases it when the process exits or crashes, so a lock file left behind
    by a dead process is stale and simply taken over; the holder's pid, host and start
    time are written into the file for the message another process prints.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._handle = None

    def holder(self) -> str | None:
        """Who holds the lock now (None when nobody does); takes nothing."""
        if not self.path.is_file():
            return None
        import fcntl

        with self.path.open("a+", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                return handle.read().strip() or "another process"
            fcntl.flock(handle, fcntl.LOCK_UN)
        return None

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            who = handle.read().strip() or "another process"
            handle.close()
            raise RunInUseError(self.path.parent, who) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            import fcntl

            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunInUseError(UserInputError):
    def __init__(self, run_dir: Path, who: str) -> None:
        super().__init__(
            f"the run directory {run_dir} is in use by another loracli process ({who}); wait for it to finish, "
            "or train into another output_dir (e.g. output_dir=runs/other as an override)"
        )


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
    holder = RunLock(run_dir).holder()
    if holder is not None:
        warnings.warn(f"{run_dir} is being trained right now ({holder}); its adapter may change when that run ends",
                      stacklevel=2)
    adapter = Path(adapter_dir) if adapter_dir else run_dir / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        status = read_status(run_dir)
        why = f" The run failed: {status.get('error')}." if status.get("state") == "failed" else ""
        raise UserInputError(
            f"no adapter in {adapter}: did the training finish? (expected adapter_config.json there).{why} "
            f"Continue it with `loracli train {run_dir / RECIPE_FILE} --resume` if it has checkpoints"
        )
    recipe = load_recipe(recipe_file)
    task = get_task(recipe.task)
    base_dir = run_dir / BASE_MODEL_DIR
    if not recipe.model.name_or_path and not base_dir.is_dir():
        raise UserInputError(
            f"{run_dir}: {BASE_MODEL_DIR}/ is missing. The run's base model was built from model.config with random "
            "weights that only that folder holds, so the run cannot be rebuilt exactly (a new random base would "
            "give wrong predictions). Restore the folder from a copy of the run, or train again"
        )
    processor_dir = run_dir / PROCESSOR_DIR
    processor = task.load_processor(recipe, source=processor_dir if processor_dir.is_dir() else None)
    id2label = _run_label_map(run_dir, adapter, recipe.task)
    labels = [id2label[i] for i in sorted(id2label)] if id2label else None
    model = task.build_model(recipe, labels, source=base_dir if base_dir.is_dir() else None)
    model = AdapterModel.from_pretrained(model, adapter)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return LoadedRun(run_dir, recipe, model, processor, task, id2label)
