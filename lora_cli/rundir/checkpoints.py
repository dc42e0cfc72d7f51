"""Checkpoints of a run: listing them, and telling a complete one from one that is not."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from lora_cli.errors import UserInputError
from lora_cli.rundir.layout import CHECKPOINT_PREFIX, CHECKPOINTS_DIR


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
