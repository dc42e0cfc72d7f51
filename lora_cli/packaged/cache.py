"""The cache of converted packaged models: built once per package version, whole or absent.

    $LORACLI_CACHE/packaged/<dist>-<version>/     (default: $XDG_CACHE_HOME/loracli, else ~/.cache/loracli)
      config.json, model.safetensors, ...          the transformers folder
      loracli-packaged.json                        the marker: package, version, converter revision,
                                                   verification figures, every file's size

A folder is converted into a hidden temporary sibling, verified there, given its marker last
and renamed into place, so a crash, a failed verification or a full disk leaves nothing that
looks finished. Processes that resolve the same package at once take an exclusive lock on
``.<dist>-<version>.lock`` beside it: one converts, the others wait and then use its folder.
An entry whose marker is missing, from another converter revision, or whose files are missing
or of another size is damaged: it is converted again and replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_cli.atomic import replace_dir
from lora_cli.errors import UserInputError
from lora_cli.packaged.base import Packaged
from lora_cli.safe_text import terminal_text

CACHE_ENV = "LORACLI_CACHE"
MARKER = "loracli-packaged.json"


def cache_root() -> Path:
    """loracli's cache folder: ``$LORACLI_CACHE``, else ``$XDG_CACHE_HOME/loracli``, else ``~/.cache/loracli``."""
    own = os.environ.get(CACHE_ENV)
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "loracli"


def entry_folder(entry: Packaged, version: str) -> Path:
    return cache_root() / "packaged" / f"{entry.dist}-{version}"


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def damage(folder: Path, entry: Packaged, version: str) -> str | None:
    """Why ``folder`` is not a finished entry for (``entry``, ``version``); None when it is."""
    if not folder.is_dir():
        return "not converted yet"
    marker = read_marker(folder)
    if marker is None:
        return f"{MARKER} is missing or unreadable"
    if (marker.get("package"), marker.get("version")) != (entry.dist, version):
        return f"it holds {marker.get('package')} {marker.get('version')}"
    if marker.get("revision") != entry.revision:
        return f"it was converted by an older converter (revision {marker.get('revision')}, now {entry.revision})"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return f"{MARKER} lists no files"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} expected"
    return None


def ensure(entry: Packaged, version: str, source: Path) -> Path:
    """The finished cache folder of ``entry`` at ``version``, converted from ``source`` if needed."""
    folder = entry_folder(entry, version)
    if damage(folder, entry, version) is None:
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(
            f"cannot create loracli's cache folder {folder.parent} ({exc}); set {CACHE_ENV} to a writable folder"
        ) from exc
    with _locked(folder):
        why = damage(folder, entry, version)
        if why is None:  # another process converted it while we waited
            return folder
        if folder.exists():
            warnings.warn(f"{folder}: {why}; converting {entry.dist} again", stacklevel=2)
        _remove_stale(folder)
        _build(entry, version, source, folder)
    return folder


def _build(entry: Packaged, version: str, source: Path, folder: Path) -> None:
    """Convert into a temporary sibling, verify, write the marker last, rename into place."""
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    start = time.monotonic()
    _progress(f"converting {entry.dist} {version} ({entry.what}) into {folder} ... ")
    try:
        with _quiet_transformers():
            figures = entry.convert(source, tmp)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        seconds = round(time.monotonic() - start, 1)
        marker = {"package": entry.dist, "version": version, "revision": entry.revision, "source": source.name,
                  "source_bytes": source.stat().st_size, "what": entry.what, "licence": entry.licence,
                  "seconds": seconds, "verification": figures, "files": files}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, folder)
    except BaseException:
        _progress("failed\n")
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _progress(f"done in {seconds:.0f} s\n")


def _progress(text: str) -> None:
    sys.stderr.write(terminal_text(text, keep_newlines=True))
    sys.stderr.flush()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' per-file progress bars and load reports off while converting (the progress line
    says what happens; the conversion's own check says whether it worked), as they were after."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _remove_stale(folder: Path) -> None:
    """Temporary folders of conversions that died (we hold the lock: nobody else is converting)."""
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``.<name>.lock`` beside ``folder``; waits, saying so, while another process holds it.
    The kernel drops the lock when its holder exits, so a crashed conversion blocks nobody."""
    import fcntl

    with (folder.parent / f".{folder.name}.lock").open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _progress(f"waiting for another process converting into {folder} ...\n")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
