"""Image classification data: every source (digits, imagefolder, CSV/JSONL, hub) as
train/eval splits with a ClassLabel column and an undecoded image column.

The checks here run before ``train`` writes anything: the folder layout, every image path
of a CSV/JSONL file, the labels (``data.missing_labels``, ``data.unknown_eval_labels``).
The image column stays ``{"bytes", "path"}``: decoding is :mod:`lora_cli.tasks.data.images`' job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from lora_cli.errors import UserInputError
from lora_cli.recipe import ImageData
from lora_cli.tasks.data import common as data_mod
from lora_cli.tasks.data import images

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = images.IMAGE_EXTENSIONS


def load_splits(data: ImageData, seed: int) -> tuple[data_mod.Splits, list[str]]:
    """Train/eval splits and the label names, without the image decode check."""
    if data.builtin == "digits":
        available = _digits()
    elif data.imagefolder:
        available = _imagefolder(Path(data.imagefolder), data)
    elif data.train_file:
        available = data_mod.load_file_splits(data)
    elif data.dataset:
        available = data_mod.load_hub_splits(data)
    else:
        raise UserInputError("data: no data source; set one of data.dataset, data.imagefolder, data.train_file, data.builtin")
    for name, ds in available.items():
        data_mod.require_columns(ds, {"data.image_column": data.image_column, "data.label_column": data.label_column})
        if data.train_file:
            source = data_mod.source_name(data, name)
            ds = _resolve_image_paths(ds, data.image_column, Path(source), data.bad_images)
        available[name] = _undecoded(ds, data.image_column)
    splits = data_mod.choose_splits(available, data, seed, stratify=data.label_column)
    labels = data_mod.encode_labels(splits, data.label_column)
    return splits, labels


def _undecoded(ds, column: str):
    """An image column as ``{"bytes", "path"}`` dicts: decoding is the shared loader's job."""
    import datasets

    feature = ds.features.get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(column, datasets.Image(decode=False))
    return ds


def warn_classes_without_training_rows(splits, column: str, labels: list[str]) -> None:
    empty = data_mod.classes_without_rows(splits.train, column, labels)
    if empty:
        shown = ", ".join(repr(c) for c in empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        logger.warning(
            "%d of the %d classes have no training images (%s): the model will not learn them", len(empty), len(labels), shown
        )


def _digits() -> dict[str, Any]:
    """scikit-learn's handwritten digits (1,797 real 8x8 scans) as RGB images (PNG bytes)."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pictures = [Image.fromarray((img * 255 / 16).astype(np.uint8)).convert("RGB") for img in digits.images]
    features = datasets.Features(
        {"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    return {"train": datasets.Dataset.from_dict({"image": pictures, "label": digits.target.tolist()}, features=features)}


def _imagefolder(root: Path, data: ImageData | None = None) -> dict[str, Any]:
    """root/{train,validation}/<class>/*.jpg, or root/<class>/*.jpg (eval carved from it).

    The classes are train/'s class folders; an empty one is refused. A validation class
    folder that train/ lacks follows ``data.unknown_eval_labels``. Images sit directly in
    the class folders: sub-folders (and links to folders, so link loops too) are not
    searched, and are named in a warning.
    """
    import datasets

    if not root.is_dir():
        raise UserInputError(f"data.imagefolder: {root} is not a folder; point it at a folder with train/ and validation/ class sub-folders")
    split_dirs = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and p.name in ("train", *data_mod.EVAL_SPLIT_FALLBACKS)}
    if "train" not in split_dirs:
        split_dirs = {"train": root}
    listing = {split: _class_folders(folder) for split, folder in split_dirs.items()}
    classes = sorted(listing["train"])
    if not classes:
        raise UserInputError(f"data.imagefolder: {root} has no class sub-folders (expected e.g. {root}/train/<class>/image.jpg)")
    empty = [c for c in classes if not listing["train"][c]]
    if empty:
        folders = ", ".join(str(split_dirs["train"] / c) for c in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise UserInputError(
            f"data.imagefolder: class folder(s) with no images: {folders}; every class folder in "
            f"{split_dirs['train']} needs at least one image directly inside it ({', '.join(sorted(IMAGE_SUFFIXES))}). "
            "Add images, or remove the folder(s)"
        )
    eval_split = _eval_split_name(split_dirs, data)
    feature = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.ClassLabel(names=classes)})
    out = {}
    for split, folder in split_dirs.items():
        found = listing[split]
        unknown = sorted(c for c in found if c not in listing["train"] and found[c])
        if unknown and split == eval_split:
            _unknown_class_folders(folder, split_dirs["train"], unknown, found, data)
        files = [(str(f), c) for c in classes for f in found.get(c, [])]
        if not files:
            raise UserInputError(f"data.imagefolder: no images under {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        paths, names = zip(*files)
        out[split] = datasets.Dataset.from_dict({"image": list(paths), "label": list(names)}, features=feature)
    return out


def _eval_split_name(split_dirs: dict[str, Path], data) -> str | None:
    """The evaluation folder :func:`data_mod.choose_splits` will pick."""
    wanted = [data.eval_split] if data is not None and data.eval_split else []
    return next((n for n in (*wanted, *data_mod.EVAL_SPLIT_FALLBACKS) if n in split_dirs and n != "train"), None)


def _unknown_class_folders(folder: Path, train_dir: Path, unknown: list[str], found: dict[str, list[Path]], data) -> None:
    rows = sum(len(found[c]) for c in unknown)
    shown = ", ".join(repr(c) for c in unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
    where = f"{folder} has class folder(s) {shown} ({rows} images) that {train_dir} lacks"
    if getattr(data, "unknown_eval_labels", "error") == "drop":
        logger.warning("data.unknown_eval_labels: drop: left out %d validation images: %s", rows, where)
        return
    raise UserInputError(
        f"data.unknown_eval_labels: {where}, so the model could never predict them. Add a {train_dir}/<class>/ "
        "folder of training images for each, remove them from the validation folder, "
        "or set data.unknown_eval_labels: drop to leave those images out"
    )


def _class_folders(split_dir: Path) -> dict[str, list[Path]]:
    """class name -> its image files (sorted), for each class folder of one split folder."""
    out: dict[str, list[Path]] = {}
    ignored: list[str] = []
    real = split_dir.resolve()
    for entry in sorted(split_dir.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if entry.is_symlink():
            target = entry.resolve()
            if target == real or target in real.parents:
                raise UserInputError(
                    f"data.imagefolder: {entry} is a symbolic link to {target}, a folder that contains it (a loop); "
                    "remove the link, or make it point at a folder of images"
                )
        try:
            children = sorted(entry.iterdir())
        except OSError as exc:
            raise UserInputError(f"data.imagefolder: cannot read the class folder {entry}: {exc.strerror or exc}") from None
        files = []
        for child in children:
            if child.name.startswith("."):
                continue
            if child.is_dir():
                ignored.append(f"{child}/ (a folder)")
            elif child.suffix.lower() in IMAGE_SUFFIXES:
                files.append(child)  # a broken link is a bad image, reported by the image check
            else:
                ignored.append(str(child))
        out[entry.name] = files
    if ignored:
        shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        logger.warning(
            "data.imagefolder: ignored %d entries of the class folders in %s that are not image files: %s "
            "(images must sit directly in <split>/<class>/; sub-folders are not searched)",
            len(ignored), split_dir, shown,
        )
    return out


def _resolve_image_paths(ds, column: str, source: Path, policy: str = "error"):
    """CSV/JSON image columns hold paths, relative to the data file's folder: all must exist.

    A missing file follows ``data.bad_images`` ("error" names the rows and paths, "skip"
    leaves the rows out with a warning). The column becomes ``datasets.Image(decode=False)``.
    """
    import datasets

    if isinstance(ds.features[column], datasets.Image):
        return ds
    base = source.parent
    resolved: list[str | None] = []
    missing: list[tuple[int, str]] = []
    for i, value in enumerate(ds[column]):
        text = "" if value is None else str(value).strip()
        if not text:
            resolved.append(None)
            missing.append((i, "no image path"))
            continue
        given = Path(text).expanduser()
        path = given if given.is_absolute() else base / given
        if not path.is_file() and not given.is_absolute() and given.is_file():
            path = given  # relative to the current folder, as older loracli read them
        if not path.is_file():
            missing.append((i, f"image file {text!r} not found"))
        resolved.append(str(path))
    if missing:
        shown = "; ".join(f"{data_mod.row_ref(str(source), i)}: {why}" for i, why in missing[:images.BAD_IMAGES_SHOWN])
        more = f" (and {len(missing) - images.BAD_IMAGES_SHOWN} more)" if len(missing) > images.BAD_IMAGES_SHOWN else ""
        where = f"{len(missing)} of the {len(resolved)} rows of {source} name no readable image in column {column!r}: {shown}{more}"
        if policy != "skip" or len(missing) == len(resolved):
            raise UserInputError(
                f"data.bad_images: {where} (relative paths are read from {base}). Fix the paths, "
                "or set data.bad_images: skip to leave those rows out"
            )
        logger.warning("data.bad_images: skip: left out %s", where)
        gone = {i for i, _ in missing}
        keep = [i for i in range(len(resolved)) if i not in gone]
        ds = ds.select(keep)
        resolved = [resolved[i] for i in keep]
    ds = ds.remove_columns([column]).add_column(column, resolved)
    return ds.cast_column(column, datasets.Image(decode=False))
