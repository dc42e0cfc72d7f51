"""What ``train`` checks about its run directory before it writes anything.

The folder may be new, a finished run (refused unless ``--overwrite``), a run that stopped
(``--resume`` continues it), or a run that died before its first checkpoint (started
again). Whatever the run reads (the recipe, the data, a local model) may never sit inside
a folder it replaces, and ``--resume`` continues only the experiment that was started.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

from lora_cli import rundir as rd
from lora_cli.errors import UserInputError
from lora_cli.recipe import load_recipe


def protected_paths(recipe, recipe_path) -> list[Path]:
    """What the command reads, and so may never sit inside a folder it replaces."""
    paths = [Path(recipe_path)]
    if recipe.source is not None:
        paths.append(recipe.source)
    paths += [Path(p) for p in recipe.data.local_paths()]
    for name in (recipe.model.name_or_path, recipe.model.tokenizer):
        if name and Path(name).expanduser().exists():
            paths.append(Path(name))
    return paths


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, dry_run: bool, protected: Sequence[Path]) -> bool:
    """Refuse what would mix or destroy data; return True when the folder is to be cleared first."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserInputError(f"output_dir {run_dir} is a file; pick a folder path (e.g. output_dir=runs/other)")
    if run_dir.is_dir() and not dry_run:
        holder = rd.RunLock(run_dir).holder()
        if holder is not None:
            raise rd.RunInUseError(run_dir, holder)
    data_dirs = [p for p in protected if p.is_dir()]  # the recipe is a file: data and model folders remain
    inside = next((d for d in data_dirs if rd.holds_protected(d, [run_dir], cwd=False) is not None), None)
    if inside is not None:
        raise UserInputError(
            f"output_dir {run_dir} lies inside {inside}, which this run reads (data or model); its files would mix "
            "with the data. Pick an output_dir outside it (e.g. output_dir=runs/my-run)"
        )
    entries = [p for p in run_dir.iterdir() if p.name != rd.LOCK_FILE] if run_dir.is_dir() else []
    if resume:
        if not rd.is_run_dir(run_dir) or not (run_dir / rd.CHECKPOINTS_DIR).is_dir():
            raise UserInputError(f"--resume: {run_dir} is not a run with a checkpoints/ folder; nothing to resume")
        return False
    if not entries:
        return False
    if overwrite:
        rd.check_replaceable(run_dir, "--overwrite", protected)
        return True
    if dry_run:
        return False
    state = rd.read_status(run_dir).get("state")
    has_checkpoints = bool(rd.checkpoints(run_dir))
    stopped = ("failed", "interrupted", "running")
    if rd.is_run_dir(run_dir) and state in stopped and not has_checkpoints:
        # a run that died before its first checkpoint holds nothing to keep: start it again
        how = {"failed": "failed", "interrupted": "was interrupted"}.get(state, "was stopped")
        rd.check_replaceable(run_dir, "output_dir", protected)
        warnings.warn(f"{run_dir} holds a run that {how} before its first checkpoint; starting it again", stacklevel=3)
        return True
    if state in stopped and has_checkpoints:
        raise UserInputError(
            f"the run in {run_dir} stopped before it finished; continue it from its newest checkpoint with --resume, "
            "replace it with --overwrite, or pick another output_dir (e.g. output_dir=runs/other as an override)"
        )
    raise UserInputError(
        f"the run directory {run_dir} already exists; continue it with --resume, replace it with --overwrite, "
        "or pick another output_dir (e.g. output_dir=runs/other as an override)"
    )


def check_left_to_train(run_dir: Path, total_steps: int, checkpoint: Path | None) -> None:
    """--resume of a run that completed every step it plans: nothing to train, and going on would
    evaluate it again and rewrite its records (train.json with 0 steps). A run stopped early by a
    callback, or given a longer length (``training.max_steps`` / ``num_train_epochs``), goes on."""
    status = rd.read_status(run_dir)
    if status.get("state") != "completed":
        return
    done = status.get("step")
    if not isinstance(done, int) and checkpoint is not None:  # runs from before status.json kept the step
        with contextlib.suppress(OSError, ValueError, AttributeError):
            done = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")).get("global_step")
    if not isinstance(done, int) or done < total_steps:
        return
    raise UserInputError(
        f"--resume: the run in {run_dir} already completed (step {done} of {total_steps}); nothing to resume. "
        "To train longer, start a new run (output_dir=runs/other as an override, or --overwrite to replace this "
        "one), or raise training.max_steps / training.num_train_epochs to continue it with --resume"
    )


# What may change when a run is continued: how long it trains, and how often it logs/saves.
RESUME_MAY_CHANGE = {"num_train_epochs", "max_steps", "logging_steps", "save_steps", "eval_steps", "save_total_limit"}


def check_same_recipe(recipe, run_dir: Path) -> None:
    """--resume continues the run that was started: a changed model, data or adapter would
    silently mix two experiments in one run directory."""
    saved_file = run_dir / rd.RECIPE_FILE
    if not saved_file.is_file():
        return
    saved, current = _flatten(load_recipe(saved_file).to_dict()), _flatten(recipe.to_dict())
    changed = sorted(
        k for k in saved.keys() | current.keys()
        if saved.get(k) != current.get(k) and not (k.startswith("training.") and k.split(".", 1)[1] in RESUME_MAY_CHANGE)
    )
    if changed:
        shown = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:5])
        raise UserInputError(
            f"--resume: the recipe differs from the one {run_dir} was started with ({shown}); only the run length "
            f"and logging/saving intervals may change. Resume with the original settings, or start a new run "
            f"(--overwrite, or output_dir=runs/other)"
        )


def _flatten(data, prefix: str = "") -> dict:
    if not isinstance(data, dict):
        return {prefix: data}
    out = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}{key}." if isinstance(value, dict) and value else f"{prefix}{key}"))
    return {k.rstrip("."): v for k, v in out.items()}
