"""Writes that are whole or absent: every file and folder loracli produces goes through here.

A file is written to a hidden temporary sibling and renamed over its target
(``os.replace`` is atomic on one file system); a folder is built beside its target and
swapped in, the previous folder kept until the new one is in place. A crash, a full disk
or an exception leaves either the old content or the new, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import os
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
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        if replace:
            replace_dir(tmp, target)
        else:
            _rename_new(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
