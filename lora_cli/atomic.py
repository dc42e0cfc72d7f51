"""Writes that are whole or absent: every file and folder loracli produces goes through here.

A file is written to a hidden temporary sibling and renamed over its target
(``os.replace`` is atomic on one file system); a folder is built beside its target and
swapped in, the previous folder kept until the new one is in place. A crash, a full disk
or an exception leaves either the old content or the new, never a mix.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lora_cli.errors import LoraCliError


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path to write; renamed onto ``path`` when the block ends without error.

    The temporary name keeps ``path``'s suffix, so writers that choose a format by
    extension (matplotlib's ``savefig``) write the right one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def replace_dir(source: Path, target: Path) -> None:
    """Rename folder ``source`` to ``target``. An existing ``target`` is moved aside first,
    put back if the rename fails, and deleted only once ``source`` is in place."""
    if not target.exists():
        os.replace(source, target)
        return
    aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, aside / target.name)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(aside / target.name, target)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """A temporary sibling folder to fill; renamed to ``target`` when the block ends without
    error, deleted otherwise.

    ``replace``: ``target`` is a folder the caller checked it may replace (its own earlier
    output): swapped out with :func:`replace_dir`. Otherwise ``target`` must still be absent
    or empty when the work is done: the rename never lands on a folder another process
    filled meanwhile (that is a :class:`~lora_cli.errors.LoraCliError`, nothing replaced).
    """
    target = Path(target)
    parent = target.resolve().parent
    tmp = None
    try:
        with writing(target, kept=" (an earlier folder there is kept)" if replace else ""):
            parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.tmp-"))
            yield tmp
            if replace:
                replace_dir(tmp, target)
            else:
                _rename_new(tmp, target)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def writing(target: str | Path, kept: str = "") -> Iterator[None]:
    """A failed write in the block (a full disk, a read-only or forbidden folder: an ``OSError``,
    or safetensors' error carrying one) becomes one :class:`~lora_cli.errors.LoraCliError`
    line naming ``target``, the cause and what to do (exit 1), instead of an internal error.
    ``kept``: what the caller's writes leave in place. A closed pipe or connection is not a
    write to ``target`` and passes through. Nested (a merge's folder built inside an export's),
    the message names the outermost target: the folder the user asked for."""
    outer = _WRITING.get()
    if outer is not None:
        target, kept = outer
    token = _WRITING.set((target, kept))
    try:
        yield
    except Exception as exc:
        code = io_errno(exc)
        if code is None:
            raise
        cause = (getattr(exc, "strerror", None) or os.strerror(code)) if code else (str(exc) or type(exc).__name__)
        filename = getattr(exc, "filename", None)
        if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
            _, filename, why = exc.args[0][0]  # copytree's first failed (source, destination, message)
            code = _errno_in(str(why))
            cause = os.strerror(code) if code else str(why)
        where = f": {filename}" if filename else ""
        raise LoraCliError(
            f"could not write {target} ({cause}{where}); nothing half-written was left there{kept}. Free some space "
            "or fix the folder's permissions, then run the command again"
        ) from exc
    finally:
        _WRITING.reset(token)


_WRITING: contextvars.ContextVar[tuple[str | Path, str] | None] = contextvars.ContextVar("writing", default=None)


_ERRNO_TEXT = re.compile(r"IoError\(Os \{ code: (\d+)|\(os error (\d+)\)|\[Errno (\d+)\]")
"""An errno inside a message: safetensors' Rust writer (``IoError(Os { code: 28, ...``, newer
``... (os error 28)``) or a copied OSError (``[Errno 28] ...``)."""


def _errno_in(text: str) -> int | None:
    match = _ERRNO_TEXT.search(text)
    return int(next(g for g in match.groups() if g)) if match else None


def io_errno(exc: BaseException) -> int | None:
    """The errno of a failed write: an ``OSError``'s (0 when it has none), or the one
    safetensors' Rust writer puts in its message (``SafetensorError: Error while serializing:
    ...``); None for anything else."""
    if isinstance(exc, (BrokenPipeError, ConnectionError)):
        return None
    if isinstance(exc, OSError):
        return exc.errno or 0
    if type(exc).__name__ == "SafetensorError" and "serializ" in str(exc):
        return _errno_in(str(exc))
    return None


def _rename_new(source: Path, target: Path) -> None:
    """``os.rename`` of a folder onto an absent or empty folder; it fails on anything else."""
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise LoraCliError(
            f"{target} was filled by another process while this command worked, so nothing was written there "
            "and its files are as that process left them. Run again with another output folder"
        ) from None
