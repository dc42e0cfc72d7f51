"""Folder safety: what may be replaced, where a verb may write, and one process per folder at a time.

The rule every verb that writes a folder or a figure follows (:func:`check_output_dir`,
:func:`check_output_file`; README "What loracli will and will not do to folders"):

1. It creates its target when it does not exist, or fills it when it is an empty folder.
2. Never, with or without ``--force`` / ``--overwrite``, is the target a symlink, the
   working directory or a folder holding it, anything the command reads (a run, the recipe,
   the data) or a folder holding one, one of a read run's own entries (``adapter/``,
   ``checkpoints/``, ...) or anything inside a data folder it reads.
3. An existing, non-empty target is replaced only when it is recognisably the same verb's
   earlier output (the marker file only that verb writes: ``export.json``, ``combine.json``,
   ...; a figure's own metadata), only with the verb's ``--force`` / ``--overwrite``, and
   never when it holds a run at any depth or another process holds its lock. A folder a
   verb adds to over time (``sweep``, ``tune``) is continued only when it holds that verb's
   marker.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from lora_cli.errors import UserInputError
from lora_cli.rundir.layout import (
    ADAPTER_DIR,
    BASE_MODEL_DIR,
    ENV_FILE,
    LOCK_FILE,
    PROCESSOR_DIR,
    RECIPE_FILE,
    RUN_ENTRIES,
)


def beside_run(run_dir: str | Path, suffix: str) -> Path:
    """A verb's default output folder for ``run_dir``: ``runs/NAME`` -> ``runs/NAME-<suffix>``,
    beside the run (never inside it)."""
    run_dir = Path(run_dir)
    return run_dir.parent / f"{run_dir.resolve().name}-{suffix}"


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


def find_run_below(folder: Path, include_self: bool = True) -> Path | None:
    """A run directory at (``include_self``) or at any depth below ``folder``, else None.

    Folder links are not followed (a link is no part of the folder that would be replaced)."""
    if include_self and is_run_dir(folder):
        return folder
    if not folder.is_dir() or folder.is_symlink():
        return None
    for top, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        if Path(top) != folder and RECIPE_FILE in files and ENV_FILE in files:
            return Path(top)
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
    nested = find_run_below(folder, include_self=False)
    if nested is not None:
        raise UserInputError(f"{what}: refusing to replace {folder}: it holds another run, {nested}. Move that run "
                             "away or pick another output_dir")


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


MODEL_PARTS = (RECIPE_FILE, ADAPTER_DIR, PROCESSOR_DIR, BASE_MODEL_DIR)
"""What rebuilding a run's model reads (``load_run``)."""


def check_run_links(run_dir: str | Path, parts: Iterable[str] = MODEL_PARTS) -> None:
    """Refuse (exit 2, naming it) a run whose entries ``parts`` hold a link that leaves the run,
    a link to a folder, or something that is not a plain file or folder (a FIFO, a device).

    Every verb calls this before it reads, copies or uploads those entries, so a file outside
    the run (a key, another project) never reaches a model card, an upload or a new run.
    A link to a file inside the run is fine; ``run_dir`` itself may be a link (the run is
    where it points). Folder links are refused because they can loop or change what
    "inside" means while a folder is copied.
    """
    run_dir = Path(run_dir)
    root = run_dir.resolve()
    for part in parts:
        top = run_dir / part
        if not top.exists() and not top.is_symlink():
            continue
        items = [top]
        if top.is_dir() and not top.is_symlink():
            for folder, dirs, files in os.walk(top, followlinks=False):
                items += [Path(folder) / name for name in sorted(dirs + files)]
        for item in items:
            _check_item(item, root, run_dir)


def _check_item(item: Path, root: Path, run_dir: Path) -> None:
    if item.is_symlink():
        target = item.resolve()
        if not _contains(root, target):
            raise UserInputError(
                f"{item} is a link to {target}, outside the run {run_dir}: loracli never reads, copies or uploads "
                "through a link that leaves a run. Put a copy of what it points to in its place, or remove the link"
            )
        if target.is_dir():
            raise UserInputError(f"{item} is a link to a folder; loracli follows no folder link inside a run. "
                                 "Put the folder itself in its place, or remove the link")
    elif item.exists() and not (item.is_file() or item.is_dir()):
        raise UserInputError(f"{item} is not a plain file (a FIFO, socket or device); loracli reads only files in a "
                             "run. Remove it")


class RunLock:
    """An exclusive ``fcntl`` lock on ``run_dir/.loracli.lock``, held while one process trains.

    The kernel releases it when the process exits or crashes, so a lock file left behind
    by a dead process is stale and simply taken over; the holder's pid, host and start
    time are written into the file for the message another process prints.
    """

    def __init__(self, run_dir: Path, hint: str | None = None) -> None:
        self.path = run_dir / LOCK_FILE
        self.hint = hint
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
            raise RunInUseError(self.path.parent, who, self.hint) from None
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
    def __init__(self, run_dir: Path, who: str, hint: str | None = None) -> None:
        if hint is None:
            hint = "or train into another output_dir (e.g. output_dir=runs/other as an override)"
            what = "the run directory"
        else:
            what = "the folder"
        super().__init__(f"{what} {run_dir} is in use by another loracli process ({who}); wait for it to finish, {hint}")


# ---------------------------------------------------------------- what verbs write
@dataclass(frozen=True)
class Output:
    """A folder or file a verb writes, and how that verb recognises its own earlier output.

    ``flag`` names the option in messages (``--out``); ``marker`` is the file inside a folder
    that only this verb writes (``export.json``); ``example`` is a value to suggest instead;
    ``is_run``: the verb's output is itself a run directory (combine, convert).
    """

    flag: str
    verb: str
    marker: str | None = None
    example: str = "new-folder/"
    is_run: bool = False

    def fix(self, start: bool = False) -> str:
        """What to do instead (``start``: opening a sentence)."""
        return f"{'P' if start else 'p'}ick a new {'file' if self.flag == '--plot' else 'folder'}, e.g. {self.flag} {self.example}"


def _check_place(path: Path, out: Output, reads: Iterable[str | Path | None]) -> None:
    """Rule 2: never the working directory, what the command reads, or inside a read run's own entries."""
    where = f"{out.flag} {path}"
    target = path.resolve()
    cwd = Path.cwd().resolve()
    if _contains(target, cwd):
        raise UserInputError(f"{where} is the working directory or holds it ({cwd}); {out.fix()}")
    for item in reads:
        if item is None:
            continue
        read = Path(item).expanduser().resolve()
        if _contains(target, read):
            kind = "the run " if is_run_dir(read) else ""
            what = f"is {kind}{item}" if target == read else f"holds {kind}{item}"
            raise UserInputError(f"{where} {what}, which this command reads: writing there would destroy it. "
                                 f"{out.fix(start=True)}")
        if target != read and _contains(read, target):
            if not is_run_dir(read):
                raise UserInputError(f"{where} lies inside {item}, which this command reads; its files would mix "
                                     f"with yours. {out.fix(start=True)}")
            entry = target.relative_to(read).parts[0]
            if entry in RUN_ENTRIES:
                raise UserInputError(f"{where} is (or lies inside) the run's own {entry} of {item}, which this "
                                     f"command reads; {out.fix()} (a new folder inside the run is fine)")


def _entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name != LOCK_FILE] if folder.is_dir() else []


def check_output_dir(path: str | Path, out: Output, reads: Iterable[str | Path | None] = (), replace: bool = False,
                     replace_flag: str | None = "--force", update: bool = False) -> bool:
    """Refuse (exit 2, one line) a target folder the rule does not allow; True when it is to be replaced.

    ``reads``: what the command reads (runs, recipe, data). ``replace``: the user passed
    ``replace_flag``. ``update``: the verb adds to its folder (sweep, tune) instead of
    replacing it, so a non-empty folder must hold its marker and is never replaced.
    Checked before any work starts; the verb writes through :func:`lora_cli.atomic.atomic_dir`.
    """
    path = Path(path)
    where = f"{out.flag} {path}"
    if path.is_symlink():
        raise UserInputError(f"{where} is a symlink; loracli writes only into a real folder: {out.fix()}")
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{where} is a file, not a folder; {out.fix()}")
    _check_place(path, out, reads)
    if not _entries(path):
        return False
    marked = out.marker is not None and (path / out.marker).is_file() and not (path / out.marker).is_symlink()
    if update:
        if not marked:
            raise UserInputError(f"{where} exists and is not a folder `loracli {out.verb}` made (no {out.marker}), so "
                                 f"its files may be yours; {out.fix()}")
        return False
    if not replace or replace_flag is None:
        also = f", or pass {replace_flag} to replace an earlier {out.verb} output" if replace_flag else ""
        raise UserInputError(f"{where} exists and is not empty; {out.fix()}{also}")
    if not marked:
        raise UserInputError(f"{where}: {replace_flag} replaces only a folder an earlier `loracli {out.verb}` wrote "
                             f"(it holds {out.marker}); this one does not, so its files may be yours. Move them away "
                             f"or {out.fix()}")
    nested = find_run_below(path, include_self=not out.is_run)
    if nested is not None:
        what = "is a run directory" if nested == path else f"holds the run {nested}"
        raise UserInputError(f"{where} {what}; {replace_flag} never replaces a folder holding a run. "
                             f"{out.fix(start=True)}")
    holder = RunLock(path).holder()
    if holder is not None:
        raise UserInputError(f"{where} is in use by another loracli process ({holder}); wait for it, or {out.fix()}")
    return True


def check_output_file(path: str | Path, out: Output, ours: Callable[[Path], bool],
                      reads: Iterable[str | Path | None] = ()) -> bool:
    """The same rule for one file (a figure): created, or replaced only when ``ours(path)`` says
    the verb wrote it. True when it will be replaced."""
    path = Path(path)
    where = f"{out.flag} {path}"
    if path.is_symlink():
        raise UserInputError(f"{where} is a symlink; loracli writes only a real file: {out.fix()}")
    if path.exists() and not path.is_file():
        raise UserInputError(f"{where} is {'a folder' if path.is_dir() else 'not a regular file'}; {out.fix()}")
    _check_place(path, out, reads)
    if not path.exists():
        return False
    if not ours(path):
        raise UserInputError(f"{where} exists and is not a figure `loracli {out.verb}` wrote, so it may be yours; "
                             f"{out.fix()}, or move that file away")
    return True
