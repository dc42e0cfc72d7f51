"""Folder safety: what may be replaced, and one training process per run at a time."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from lora_cli.errors import UserInputError
from lora_cli.rundir.layout import ENV_FILE, LOCK_FILE, RECIPE_FILE


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
