"""Writes that are whole or absent: every file and folder loracli produces goes through here.

A file is written to a hidden temporary sibling and renamed over its target
(``os.replace`` is atomic on one file system); a folder is built beside its target and
swapped in, the previous folder kept until the new one is in place. A crash, a full disk
or an exception leaves either the old content or the new, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


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
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """A temporary sibling folder to fill; swapped in for ``target`` (an empty or existing
    folder, replaced) when the block ends without error, deleted otherwise."""
    target = Path(target)
    parent = target.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
