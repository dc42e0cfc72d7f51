"""Image classification: images + labels -> a ViT-style model with a new head.

dataset -> label maps -> image processor -> on-the-fly transforms -> collate -> model -> accuracy

Transforms follow the Food-101 LoRA guide: train RandomResizedCrop + RandomHorizontalFlip
+ normalize; eval Resize + CenterCrop + normalize, with size/mean/std from the model's
own image processor. They run on the fly (``set_transform``), so the dataset keeps its
image column and the Trainer is told not to drop it. Every image is decoded by
:func:`lora_cli.tasks.images.load_image`, the loader ``predict`` uses too, and ``predict``
applies the same eval transforms: the same file gives the same tensor in every verb.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_cli.errors import UserInputError
from lora_cli.hub import require_hub
from lora_cli.tasks import data as data_mod
from lora_cli.tasks import images

logger = logging.getLogger(__name__)

NAME = "image-classification"
PEFT_TASK_TYPE = None
HEAD_NAMES = ("classifier", "score", "head")
IMAGE_SUFFIXES = images.IMAGE_EXTENSIONS
MODEL_HINT = "Set model.name_or_path to a local model directory, or use model.config for a randomly initialised model."


# ------------------------------------------------------------------------- data
def load_raw(recipe) -> tuple[data_mod.Splits, list[str]]:
    """Train/eval splits with a ClassLabel label column, and the label names.

    Every check runs here, before ``train`` writes anything: the folder layout, every
    image path of a CSV/JSONL file, the labels (``data.missing_labels``,
    ``data.unknown_eval_labels``), and a decode check of every image of both splits
    (``data.bad_images``). The image column stays undecoded (``{"bytes", "path"}``);
    the transforms decode each image with :func:`lora_cli.tasks.images.load_image`.
    """
    splits, labels = _load(recipe)
    for attr, what in (("train", "training"), ("eval", "validation")):
        setattr(splits, attr, images.check_dataset(getattr(splits, attr), recipe.data.image_column,
                                                   recipe.data.bad_images, what))
    _warn_classes_without_training_rows(splits, recipe.data.label_column, labels)
    return splits, labels


def _load(recipe) -> tuple[data_mod.Splits, list[str]]:
    """:func:`load_raw` without the image decode check."""
    data = recipe.data
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
    splits = data_mod.choose_splits(available, data, recipe.seed, stratify=data.label_column)
    labels = data_mod.encode_labels(splits, data.label_column)
    return splits, labels


def _undecoded(ds, column: str):
    """An image column as ``{"bytes", "path"}`` dicts: decoding is the shared loader's job."""
    import datasets

    feature = ds.features.get(column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(column, datasets.Image(decode=False))
    return ds


def _warn_classes_without_training_rows(splits, column: str, labels: list[str]) -> None:
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


def _imagefolder(root: Path, data=None) -> dict[str, Any]:
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


# ------------------------------------------------------------- processor, model
def load_processor(recipe, source: str | Path | None = None):
    """The model's own image processor (hub/local), or a ViT one sized from model.config."""
    from transformers import AutoImageProcessor, ViTImageProcessor

    model = recipe.model
    path = source or model.name_or_path
    if path:
        require_hub(str(path), "model.name_or_path", local_hint=MODEL_HINT)
        return AutoImageProcessor.from_pretrained(str(path), revision=model.revision, trust_remote_code=model.trust_remote_code)
    size = int(model.config.get("image_size", 224))
    kwargs = {"size": {"height": size, "width": size}} | dict(model.processor or {})
    return ViTImageProcessor(**kwargs)


def build_model(recipe, labels: list[str], source: str | Path | None = None):
    from transformers import AutoConfig, AutoModelForImageClassification

    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    model = recipe.model
    path = source or model.name_or_path
    if path:
        require_hub(str(path), "model.name_or_path", local_hint=MODEL_HINT)
        return AutoModelForImageClassification.from_pretrained(
            str(path),
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
        )
    cfg = dict(model.config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise UserInputError("model.config: needs a model_type (e.g. vit)")
    try:
        config = AutoConfig.for_model(model_type, num_labels=len(labels), id2label=id2label, label2id=label2id, **cfg)
        return AutoModelForImageClassification.from_config(config)
    except (ValueError, TypeError) as exc:
        raise UserInputError(f"model.config: cannot build a {model_type} image classifier: {exc}") from exc


def heads(model) -> list[str]:
    """Top-level classification head(s): new weights that must train and be saved."""
    return [name for name, _ in model.named_children() if name in HEAD_NAMES]


# --------------------------------------------------------------- transforms
def _sizes(processor) -> tuple[tuple[int, int], tuple[int, int]]:
    size = processor.size
    if "shortest_edge" in size:
        resize = crop = (size["shortest_edge"], size["shortest_edge"])
    else:
        resize = crop = (size["height"], size["width"])
    crop_size = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop_size:
        crop = (crop_size["height"], crop_size["width"])
    return resize, crop


def transforms(processor, train: bool, augment: bool = True):
    """RGB PIL image -> normalised tensor; ``train=False`` is what eval and predict both use."""
    from torchvision import transforms as T

    resize, crop = _sizes(processor)
    mean = getattr(processor, "image_mean", None) or [0.5, 0.5, 0.5]
    std = getattr(processor, "image_std", None) or [0.5, 0.5, 0.5]
    normalize = T.Normalize(mean=mean, std=std)
    if train and augment:
        return T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), normalize])


def with_transforms(ds, processor, recipe, train: bool):
    """Rows as ``{"pixel_values", "labels"}``: each image decoded by the shared loader, then ``transforms``."""
    tf = transforms(processor, train, augment=getattr(recipe.data, "augment", True))
    image_col, label_col = recipe.data.image_column, recipe.data.label_column

    def apply(batch: dict[str, list]) -> dict[str, list]:
        return {
            "pixel_values": [tf(images.load_image(img)) for img in batch[image_col]],
            "labels": batch[label_col],
        }

    ds = ds.with_transform(apply)
    return ds


class SeededAugmentation(torch.utils.data.Dataset):
    """Training rows whose random crops and flips depend only on (seed, epoch, row).

    Drawn from the global RNG, augmentations would depend on when the data loader makes
    each batch (it prefetches one ahead), and a run resumed mid-epoch would see other
    crops than the run that never stopped. The Trainer calls ``set_epoch``.
    """

    def __init__(self, ds, seed: int) -> None:
        self.ds, self.seed, self.epoch = ds, seed, 0

    def __len__(self) -> int:
        return len(self.ds)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, int(index))) % 2**63)
            return self.ds[index]


def prepare(splits: data_mod.Splits, processor, recipe):
    train = with_transforms(splits.train, processor, recipe, True)
    if getattr(recipe.data, "augment", True):
        train = SeededAugmentation(train, recipe.seed)
    return train, with_transforms(splits.eval, processor, recipe, False)


def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([row["pixel_values"] for row in batch]),
        "labels": torch.tensor([int(row["labels"]) for row in batch]),
    }


def compute_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def eval_dataset(recipe, processor, split: str = "validation", limit: int | None = None):
    """The recipe's evaluation data with eval transforms (for `loracli eval` / merge checks)."""
    splits, _ = _load(recipe)
    ds = splits.train if split == "train" else splits.eval
    ds = data_mod.limit(ds, limit, recipe.seed)
    what = "training" if split == "train" else "validation"
    ds = images.check_dataset(ds, recipe.data.image_column, recipe.data.bad_images, what)  # only the rows used
    return with_transforms(ds, processor, recipe, train=False)


def synthetic_batch(processor, n: int = 4) -> dict[str, torch.Tensor]:
    """Random inputs of the right shape, when no data is reachable."""
    _, crop = _sizes(processor)
    return {"pixel_values": torch.randn(n, 3, *crop)}
