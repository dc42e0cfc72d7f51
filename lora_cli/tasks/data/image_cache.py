"""Decode once: every image of a split stored as resized uint8 pixels in an on-disk cache.

    image column ({"bytes", "path"} or path) --load + EXIF + RGB--> resize (short side or exact)
        --> [center crop] --> uint8 HWC --> datasets Arrow cache file, keyed by content

The per-image PIL path decodes every JPEG again in every epoch; decoding dominates its
cost. :func:`decode_cache` runs that work once per split, through ``datasets.Dataset.map``
(batched, with its progress bar), and writes the result to a cache file whose name is a
key over the images' *content* and the geometry, so a second ``train`` and ``loracli
eval`` reuse it, and an edited folder never serves stale pixels:

- rows that name a file are keyed on (path, size, mtime_ns), so editing, replacing or
  touching a file rebuilds the cache;
- rows that embed bytes are keyed on the dataset's fingerprint when it is backed by Arrow
  files (hub datasets: ``datasets`` derives it from the data files), else on a hash of
  the bytes (in-memory datasets such as the builtin digits).

Pixels are stored **HWC** (rows of RGB triples, as decoders produce them), viewed as
``(3, H, W)`` tensors in ``torch.channels_last`` memory format by
:mod:`lora_cli.tasks.data.image_batches`; that layout is also the one torch's uint8 bilinear
antialiased resize runs fastest on. Two storages:

- ``"raw"`` (default): the uint8 array itself. No decode at read time; 3 bytes per pixel
  (about 224 KiB per image at 256 px short side; Food-101's 75,750 training
  images: about 16 GiB).
- ``"jpeg"``: the resized image re-encoded as JPEG (``jpeg_quality``, default 90): about a
  tenth of the disk (20.7 KiB per image), and a small JPEG decode per image per epoch
  (about 0.3 ms; see bench/README.md).

Decoding follows :func:`lora_cli.tasks.data.images.load_image` (size limit, EXIF orientation,
modes to RGB), plus JPEG *draft* mode: a JPEG at least twice the target size in both
dimensions is decoded by libjpeg at 1/2, 1/4 or 1/8 scale (never below the target), then
resized. Resizing is torchvision's bilinear with antialias on uint8 tensors, within one
grey level of PIL's bilinear resize that ``transforms()`` uses.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from lora_cli.progress import Phase, counted
from lora_cli.tasks.data import images

Storage = Literal["raw", "jpeg"]
Size = int | tuple[int, int]

RAW_COLUMN = "image_u8"
"""Column of raw HWC uint8 pixels (``storage="raw"``)."""
JPEG_COLUMN = "image_jpeg"
"""Column of re-encoded JPEG bytes (``storage="jpeg"``)."""
HEIGHT, WIDTH = "image_height", "image_width"
PIXEL_COLUMNS = (RAW_COLUMN, JPEG_COLUMN, HEIGHT, WIDTH)

CACHE_VERSION = 1
"""Part of every cache key: bump it when the stored pixels of the same input change."""

TRAIN_SIZE_RATIO = 8 / 7
"""Cached short side / crop side for training (224 -> 256), so the random crops are cut
from an image close to the crop's resolution."""


def train_short_side(crop: Size) -> int:
    """The short side to cache a training split at for a ``crop`` (224 -> 256)."""
    side = max(crop) if isinstance(crop, tuple) else crop
    return int(round(side * TRAIN_SIZE_RATIO))


# ------------------------------------------------------------------- one image
def decode_one(source: Any, size: Size, center_crop: tuple[int, int] | None = None, *, draft: bool = True,
               max_pixels: int = images.MAX_IMAGE_PIXELS, interpolation: str = "bilinear") -> np.ndarray:
    """One image as the cache stores it: uint8 ``(H, W, 3)``.

    ``size`` follows torchvision's ``Resize``: an int is the short side (aspect kept), a
    pair is the exact ``(height, width)``. ``center_crop`` then cuts the middle
    ``(height, width)`` (zero-padded if the image is smaller, as torchvision does).
    ``draft=False`` decodes every JPEG in full (what the eval split uses to equal the
    per-image path within one grey level). ``interpolation``: ``bilinear`` (default), ``bicubic``
    or ``nearest`` (the model's :class:`~lora_cli.tasks.data.image_settings.ImageSettings`).
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    pixels, upright = load_pixels(source, size if draft else None, max_pixels)
    # the target comes from the full-size image: a draft's rounded-up sides must not move it
    out = F.resize(pixels, _resize_target(size, *upright), interpolation=InterpolationMode(interpolation),
                   antialias=interpolation != "nearest")
    if center_crop is not None:
        out = F.center_crop(out, list(center_crop))
    return out.permute(1, 2, 0).contiguous().numpy()


def _resize_target(size: Size, height: int, width: int) -> list[int]:
    """(height, width) torchvision's Resize gives an image of ``height`` x ``width``."""
    if isinstance(size, tuple):
        return [size[0], size[1]]
    short, long = sorted((height, width))
    new_long = int(size * long / short)
    return [size, new_long] if height <= width else [new_long, size]


def load_pixels(source: Any, draft_size: Size | None = None,
                max_pixels: int = images.MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, tuple[int, int]]:
    """An upright RGB image as uint8 ``(3, h, w)`` (HWC memory), and its full-size (height, width).

    :func:`images.load_image`'s checks and conversions, with two shortcuts for JPEGs:
    with ``draft_size`` (Resize semantics) one at least twice that size is decoded by
    libjpeg at 1/2, 1/4 or 1/8 scale, never below it; an RGB or greyscale JPEG decoded
    in full goes through torchvision's libjpeg-turbo decoder straight into a tensor (the
    same pixels as Pillow's, without Pillow's two copies). Errors are
    :class:`images.ImageLoadError`, naming the file.
    """
    if isinstance(source, Image.Image):
        return _from_pil(images.load_image(source, max_pixels))
    with images.opened(source, max_pixels) as (img, fp):
        width, height = img.size
        rotated = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientation swaps the axes
        upright = (width, height) if rotated else (height, width)
        request = _draft_request(draft_size, upright, rotated) if draft_size is not None else None
        reduces = request is not None and min(width // request[0], height // request[1]) >= 2
        if img.format == "JPEG" and reduces:
            img.draft(None, request)
        elif img.format == "JPEG" and img.mode in ("RGB", "L"):
            return _decode_jpeg(fp), upright
        img.load()
        return _from_pil(images.to_rgb(ImageOps.exif_transpose(img) or img))[0], upright


def _from_pil(img: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1), (img.height, img.width)


def _decode_jpeg(fp: Any) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    data = bytearray(fp.getvalue() if hasattr(fp, "getvalue") else Path(fp).read_bytes())
    # (3, h, w) with HWC strides; EXIF orientation applied as ImageOps.exif_transpose does
    return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB, apply_exif_orientation=True)


def _draft_request(size: Size, upright: tuple[int, int], rotated: bool) -> tuple[int, int]:
    """(width, height) in the file's orientation that the draft must reach or exceed."""
    th, tw = _resize_target(size, *upright)
    if rotated:
        th, tw = tw, th
    return max(1, tw), max(1, th)


# ------------------------------------------------------------------- cache key
def content_key(ds, image_column: str) -> str:
    """A hex digest that changes whenever any image of ``ds[image_column]`` changes."""
    digest = hashlib.blake2b(digest_size=16)
    embedded_covered = bool(ds.cache_files)  # Arrow-backed: the fingerprint covers embedded bytes
    digest.update(f"{len(ds)}|{ds._fingerprint if embedded_covered else ''}".encode())  # noqa: SLF001
    column = ds.select_columns([image_column]).with_format("arrow")
    for table in column.iter(batch_size=1024):
        values = table.column(0).combine_chunks()
        if values.type.num_fields:  # struct<bytes, path>
            blobs, paths = values.field("bytes"), values.field("path")
        else:  # plain path strings
            blobs, paths = None, values
        for i in range(len(values)):
            blob = blobs[i] if blobs is not None else None
            if blob is not None and blob.is_valid:
                digest.update(b"B" if embedded_covered else b"B" + blob.as_buffer().to_pybytes())
            else:
                digest.update(_file_key(paths[i].as_py()))
    return digest.hexdigest()


def default_cache_dir() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "loracli-decoded"


def checked_marker(ds, image_column: str, max_pixels: int, cache_dir: str | Path | None = None) -> Path:
    """The file that says every image of ``ds[image_column]`` (as they are now) decoded cleanly.

    Keyed like the decode cache (:func:`content_key`): an edited, added or removed image
    changes the key, so its check runs again. ``train`` writes it after a clean check, and the
    next run (or ``eval``) skips decoding every image just to check it.
    """
    key = hashlib.sha256(f"{CACHE_VERSION}|{content_key(ds, image_column)}|{max_pixels}".encode()).hexdigest()[:32]
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"checked-{key}"


def _file_key(path: str | None) -> bytes:
    if not path:
        return b"N"
    try:
        info = os.stat(path)
    except OSError:
        return f"M{path}".encode()
    return f"F{path}\0{info.st_size}\0{info.st_mtime_ns}".encode()


# ----------------------------------------------------------------------- cache
def decode_cache(ds, image_column: str, *, size: Size, center_crop: tuple[int, int] | None = None,
                 storage: Storage = "raw", draft: bool = True, jpeg_quality: int = 90,
                 cache_dir: str | Path | None = None, num_proc: int | None = None, desc: str | None = None,
                 max_pixels: int = images.MAX_IMAGE_PIXELS, interpolation: str = "bilinear"):
    """``ds`` with ``image_column`` replaced by cached pixels, built once and then reused.

    The result has every other column of ``ds`` unchanged plus :data:`RAW_COLUMN` (or
    :data:`JPEG_COLUMN`), :data:`HEIGHT` and :data:`WIDTH`. The pixels live in
    ``<cache_dir>/decoded-<key>.arrow`` (``cache_dir`` default:
    ``$HF_DATASETS_CACHE/loracli-decoded``), where the key covers the images' content
    (:func:`content_key`), the geometry, the storage and :data:`CACHE_VERSION`; only the
    image-derived columns are cached, so a label change never needs a rebuild. With
    ``num_proc`` > 1 datasets writes one file per process (``..._00000_of_00004.arrow``)
    and reuses them for the same ``num_proc``.
    """
    import datasets

    if storage not in ("raw", "jpeg"):
        raise ValueError(f"storage must be 'raw' or 'jpeg', not {storage!r}")
    crop = tuple(center_crop) if center_crop is not None else None
    params = {"v": CACHE_VERSION, "content": content_key(ds, image_column), "size": size, "crop": crop,
              "storage": storage, "draft": draft, "max_pixels": max_pixels,
              "quality": jpeg_quality if storage == "jpeg" else None}
    if interpolation != "bilinear":  # bilinear caches keep the keys they had before the choice existed
        params["interpolation"] = interpolation
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:32]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    column = RAW_COLUMN if storage == "raw" else JPEG_COLUMN
    features = datasets.Features({column: datasets.Value("binary"), HEIGHT: datasets.Value("int32"),
                                  WIDTH: datasets.Value("int32")})

    def decode_batch(batch: list[Any]) -> dict[str, list]:
        out: dict[str, list] = {column: [], HEIGHT: [], WIDTH: []}
        for source in batch:
            pixels = decode_one(source, size, crop, draft=draft, max_pixels=max_pixels, interpolation=interpolation)
            out[column].append(pixels.tobytes() if storage == "raw" else _encode_jpeg(pixels, jpeg_quality))
            out[HEIGHT].append(pixels.shape[0])
            out[WIDTH].append(pixels.shape[1])
        return out

    shape = f"{size[0]}x{size[1]}" if isinstance(size, tuple) else f"short side {size}"
    what = "" if crop is None else f", crop {crop[0]}x{crop[1]}"
    label = desc or f"decoding images ({shape}{what})"
    with Phase(label, total=len(ds), unit="images"):  # shown only if it decodes (not served from the cache)
        pixels = ds.map(
            # small batches (8 decoded images, 64 per written record batch, about 1.8 / 14 MiB raw at 256 px):
            # their buffers are reused instead of fresh pages faulted in per batch (1.13 -> 0.75 CPU s for
            # 512 photos, bench/README.md)
            counted(decode_batch, batched=True), batched=True, batch_size=8, input_columns=[image_column],
            remove_columns=ds.column_names, features=features, cache_file_name=str(folder / f"decoded-{key}.arrow"),
            new_fingerprint=key, load_from_cache_file=True, writer_batch_size=64,
            num_proc=num_proc if num_proc and num_proc > 1 else None, desc=label,
        )
    rest = ds.remove_columns([image_column])
    return datasets.concatenate_datasets([rest, pixels], axis=1) if rest.column_names else pixels


def _encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# ------------------------------------------------------------------- read back
def storage_of(ds) -> Storage:
    """Which storage a dataset returned by :func:`decode_cache` holds."""
    if RAW_COLUMN in ds.column_names:
        return "raw"
    if JPEG_COLUMN in ds.column_names:
        return "jpeg"
    raise ValueError(f"not a decoded image cache: none of {RAW_COLUMN!r}, {JPEG_COLUMN!r} in {ds.column_names}")


def rows_as_arrays(table, storage: Storage) -> list[np.ndarray]:
    """The uint8 ``(H, W, 3)`` images of an Arrow table of cached rows.

    Raw rows are read-only views into the table's buffers (no copy); JPEG rows are
    decoded with torchvision's libjpeg-turbo decoder.
    """
    heights = table.column(HEIGHT).to_numpy()
    widths = table.column(WIDTH).to_numpy()
    blobs = [b.as_buffer() for chunk in table.column(RAW_COLUMN if storage == "raw" else JPEG_COLUMN).chunks
             for b in chunk]
    if storage == "raw":
        return [np.frombuffer(b, dtype=np.uint8).reshape(int(h), int(w), 3) for b, h, w in zip(blobs, heights, widths)]
    from torchvision.io import ImageReadMode, decode_jpeg

    return [decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)
            .permute(1, 2, 0).numpy() for b in blobs]


def cache_bytes(ds) -> int:
    """Bytes on disk of the cache files behind a decoded dataset."""
    return sum(os.path.getsize(f["filename"]) for f in ds.cache_files if os.path.exists(f["filename"]))
