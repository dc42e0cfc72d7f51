"""Images as users have them, for every verb: one loader, one set of checks.

:func:`load_image` turns one image (a file path, raw bytes, or the ``{"bytes", "path"}``
dict a ``datasets.Image(decode=False)`` column holds) into an upright RGB PIL image, or
raises :class:`ImageLoadError` naming the file and the reason. ``train`` and ``eval``
decode every image with it inside the task's transform, and ``predict`` reads files with
it, so all three verbs give the model the same pixels.

:func:`check_image` runs the same checks cheaply (header, size limit, a reduced JPEG
decode) and :func:`check_dataset` runs it over a whole split before training, so a broken
file is found before the run directory exists. :func:`expand_inputs` turns the paths,
folders and globs given on the command line into a sorted list of image files; it follows
symbolic links to folders once and never loops.

Transparency is composited onto white (not dropped): pixels under a fully transparent
area often hold arbitrary colours (commonly black), and a viewer shows them as the page
background, which is usually white. 16-bit greyscale is scaled to 8 bits (not clipped).
CMYK is converted with Pillow's plain conversion (embedded ICC profiles are not applied).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_cli.errors import UserInputError
from lora_cli.progress import Phase

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)

MAX_IMAGE_PIXELS = 8192 * 8192
"""Largest image accepted (about 67 megapixels, 200 MB decoded as RGB). Larger files are
refused as possible decompression bombs; photos from phones are far below this."""

BAD_IMAGES_SHOWN = 5
"""How many bad images an error or warning names (the count covers all of them)."""

_GLOB_CHARS = frozenset("*?[")


class ImageLoadError(UserInputError):
    """One image could not be used; the message names the file (or row) and why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


# ------------------------------------------------------------------- loading
def load_image(source: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """``source`` (path, bytes, ``{"bytes", "path"}`` dict or PIL image) as an upright RGB image."""
    return _decode(source, max_pixels, reduced=False)


def check_image(source: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Raise :class:`ImageLoadError` if :func:`load_image` would fail on ``source``.

    Cheaper than loading: JPEGs are decoded at 1/8 scale (libjpeg still reads every byte,
    so a truncated file is still found); other formats are decoded in full.
    """
    _decode(source, max_pixels, reduced=True)


def image_name(source: Any) -> str | None:
    """The file a source refers to, for messages (None for bare bytes or decoded images)."""
    if isinstance(source, Mapping):
        path = source.get("path")
        return str(path) if path else None
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return None


def _decode(source: Any, max_pixels: int, reduced: bool) -> Image.Image:
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source) or source)
    with opened(source, max_pixels) as (img, _):
        if reduced and img.format == "JPEG":
            width, height = img.size
            img.draft(None, (max(1, width // 8), max(1, height // 8)))
        img.load()
        return to_rgb(ImageOps.exif_transpose(img) or img)


@contextlib.contextmanager
def opened(source: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[tuple[Image.Image, Any]]:
    """``(image, fp)`` (``fp``: the path or bytes buffer it was read from) opened lazily (nothing decoded yet) once its header passed the
    pixel limit; any failure inside, decoding included, is an :class:`ImageLoadError` naming it."""
    fp, name = _open(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageLoadError(
                        name,
                        f"image is {width}x{height} ({width * height:,d} pixels), above the limit of "
                        f"{max_pixels:,d}; refusing it as a possible decompression bomb (resize it first)",
                    )
                yield img, fp
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(name, f"refused as a possible decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not an image file Pillow can read (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated/corrupt data as OSError, bad headers as SyntaxError/ValueError
        raise ImageLoadError(name, f"corrupt or truncated image ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file, not a crash
        raise ImageLoadError(name, f"corrupt image ({type(exc).__name__}: {exc})") from None


def _open(source: Any) -> tuple[Any, str]:
    """A path or file object Pillow can open, and the name messages use."""
    if isinstance(source, Mapping):
        data, path = source.get("bytes"), source.get("path")
        if data is not None:
            if not len(data):
                raise ImageLoadError(path or "image bytes", "empty image (0 bytes)")
            return io.BytesIO(data), str(path or "image bytes")
        if path:
            return _open(path)
        raise ImageLoadError("image", "no image data (the row has neither bytes nor a path)")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise ImageLoadError("image bytes", "empty image (0 bytes)")
        return io.BytesIO(bytes(source)), "image bytes"
    if source is None:
        raise ImageLoadError("image", "no image (the value is empty)")
    path = Path(source)
    try:
        size = path.stat().st_size
    except OSError:
        if path.is_symlink():
            raise ImageLoadError(path, f"a symbolic link to {os.readlink(path)} that does not resolve") from None
        raise ImageLoadError(path, "no such file") from None
    if not path.is_file():
        raise ImageLoadError(path, "not a regular file")
    if size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    return path, str(path)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited onto white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("P", "L") and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_to_uint8(np.asarray(img)), mode="L").convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot convert image mode {mode!r} to RGB: {exc}") from None


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """16-bit / 32-bit / float greyscale to 0..255."""
    arr = arr.astype(np.float64)
    peak = float(arr.max()) if arr.size else 0.0
    if peak <= 1.0:
        scale = 255.0  # float images in 0..1
    elif peak <= 255.0:
        scale = 1.0
    else:
        scale = 255.0 / 65535.0
    return np.clip(arr * scale, 0, 255).round().astype(np.uint8)


# ------------------------------------------------------------ dataset checks
def check_dataset(ds, column: str, policy: str, what: str, max_pixels: int = MAX_IMAGE_PIXELS):
    """Check every image of ``ds[column]``; ``policy`` "error" raises, "skip" drops them.

    ``what`` names the split in messages ("training", "validation"). Returns ``ds``
    (without the bad rows under "skip").
    """
    n = len(ds)
    if n == 0:
        return ds
    bad = _bad_rows(ds, column, max_pixels, what)
    if not bad:
        return ds
    shown = "; ".join(f"{name}: {reason}" for _, name, reason in bad[:BAD_IMAGES_SHOWN])
    more = f" (and {len(bad) - BAD_IMAGES_SHOWN} more)" if len(bad) > BAD_IMAGES_SHOWN else ""
    if policy != "skip":
        raise UserInputError(
            f"data.bad_images: {len(bad)} of the {n} {what} images cannot be read: {shown}{more}. "
            "Fix or remove these files, or set data.bad_images: skip to train without them"
        )
    if len(bad) == n:
        raise UserInputError(f"data.bad_images: none of the {n} {what} images can be read: {shown}{more}")
    logger.warning("data.bad_images: skip: left out %d of the %d %s images: %s%s", len(bad), n, what, shown, more)
    dropped = {i for i, _, _ in bad}
    return ds.select([i for i in range(n) if i not in dropped])


def _bad_rows(ds, column: str, max_pixels: int, what: str) -> list[tuple[int, str, str]]:
    """(row, name, reason) of every image that fails :func:`check_image`, in row order."""
    n = len(ds)
    column_ds = ds.select_columns([column])
    chunk = 256

    def problem(item: Any) -> tuple[str | None, str] | None:
        try:
            check_image(item, max_pixels)
        except ImageLoadError as exc:
            return image_name(item), exc.reason
        return None

    bad: list[tuple[int, str, str]] = []
    # a phase of its own only where it is long enough to notice
    shown = Phase(f"checking {what} images", total=n, unit="images") if n >= 2000 else None
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool, shown or contextlib.nullcontext():
        for start in range(0, n, chunk):
            items = column_ds[start : start + chunk][column]
            for offset, found in enumerate(pool.map(problem, items)):
                if found is not None:
                    name, reason = found
                    bad.append((start + offset, name or f"{what} row {start + offset}", reason))
            if shown is not None:
                shown.advance(len(items))
    return bad


# ------------------------------------------------------- command-line inputs
def expand_inputs(items: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for image files (sorted), globs expanded.

    A file named explicitly is kept whatever its extension (a bad one fails on its own
    later); inside folders and globs only image extensions count. Duplicates are dropped.
    Symbolic links to folders are followed once: a link back to a folder already searched
    (a loop) is skipped with a warning. ``**`` in a glob does not follow folder links.
    """
    found: list[Path] = []
    missing: list[str] = []
    empty: list[str] = []
    for item in items:
        text = str(item)
        path = Path(text).expanduser()
        if path.is_dir():
            files = sorted(p for p in walk_files(path) if _is_image_file(p, path))
        elif path.is_file():
            files = [path]
        elif _GLOB_CHARS & set(text):
            files = sorted(_glob(path))
        else:
            missing.append(text)
            continue
        if files:
            found.extend(files)
        else:
            empty.append(text)
    if missing:
        raise UserInputError(
            f"no such file or folder: {', '.join(missing)} (check the path; quote globs like 'photos/*.jpg')"
        )
    unique = list(dict.fromkeys(found))
    if not unique:
        where = ", ".join(empty) or "(no paths given)"
        raise UserInputError(
            f"no image files found in {where} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return unique


def walk_files(root: Path) -> Iterator[Path]:
    """Every non-hidden file under ``root``; each real folder is entered once (no link loops)."""
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            info = folder.stat()
            entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
        except OSError as exc:
            logger.warning("skipped %s: %s", folder, exc.strerror or exc)
            continue
        key = (info.st_dev, info.st_ino)
        if key in seen:
            logger.warning("skipped %s: a link to %s, a folder already searched", folder, folder.resolve())
            continue
        seen.add(key)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                stack.append(Path(entry.path))
            else:
                yield Path(entry.path)


def _glob(pattern: Path) -> list[Path]:
    """Glob matches that are image files; ``**`` does not follow folder links (glob.glob's does, and loops)."""
    parts = pattern.parts
    first = next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
    anchor = Path(*parts[:first]) if first else Path(".")
    rest = "/".join(parts[first:])
    if not anchor.is_dir():
        return []
    return [p for p in anchor.glob(rest) if _is_image_file(p, anchor)]


def _is_image_file(path: Path, root: Path | None = None) -> bool:
    parts = path.relative_to(root).parts if root is not None else (path.name,)
    if any(part.startswith(".") for part in parts):
        return False
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
