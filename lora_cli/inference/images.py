"""Images as users have them: any file, any mode, any orientation, possibly broken.

:func:`load_image` turns one file into an upright RGB PIL image or raises
:class:`ImageLoadError` naming the file and the reason. :func:`expand_inputs` turns the
paths, folders and globs given on the command line into a sorted list of image files.

Transparency is composited onto white (not dropped): pixels under a fully transparent
area often hold arbitrary colours (commonly black), and a viewer shows them as the page
background, which is usually white. CMYK is converted with Pillow's plain conversion
(embedded ICC profiles are not applied).
"""

from __future__ import annotations

import glob
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_cli.errors import UserInputError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)

MAX_IMAGE_PIXELS = 8192 * 8192
"""Largest image accepted (about 67 megapixels, 200 MB decoded as RGB). Larger files are
refused as possible decompression bombs; photos from phones are far below this."""

_GLOB_CHARS = frozenset("*?[")


class ImageLoadError(UserInputError):
    """One image file could not be used; the message names the file and why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Read ``path`` as an upright RGB image (EXIF orientation applied, alpha on white)."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(path, "no such file" if not path.exists() else "not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageLoadError(
                        path,
                        f"image is {width}x{height} ({width * height:,d} pixels), above the limit of "
                        f"{max_pixels:,d}; refusing it as a possible decompression bomb (resize it first)",
                    )
                img.load()
                img = ImageOps.exif_transpose(img) or img
                return to_rgb(img)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(path, f"refused as a possible decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file Pillow can read (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated/corrupt data as OSError, bad headers as SyntaxError/ValueError
        raise ImageLoadError(path, f"corrupt or truncated image ({exc})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited onto white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
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


def expand_inputs(items: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for image files (sorted), globs expanded.

    A file named explicitly is kept whatever its extension (a bad one fails on its own
    later); inside folders and globs only image extensions count. Duplicates are dropped.
    """
    found: list[Path] = []
    missing: list[str] = []
    empty: list[str] = []
    for item in items:
        text = str(item)
        path = Path(text).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if _is_image_file(p, path))
        elif path.is_file():
            files = [path]
        elif _GLOB_CHARS & set(text):
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if _is_image_file(Path(p)))
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


def _is_image_file(path: Path, root: Path | None = None) -> bool:
    parts = path.relative_to(root).parts if root is not None else (path.name,)
    if any(part.startswith(".") for part in parts):
        return False
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
