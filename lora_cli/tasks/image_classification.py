"""Image classification: images + labels -> a ViT-style model with a new head.

dataset -> label maps -> image processor -> on-the-fly transforms -> collate -> model -> accuracy

Transforms follow the Food-101 LoRA guide: train RandomResizedCrop + RandomHorizontalFlip
+ normalize; eval Resize + CenterCrop + normalize, with size/mean/std from the model's
own image processor. They run on the fly (``set_transform``), so the dataset keeps its
image column and the Trainer is told not to drop it.
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

logger = logging.getLogger(__name__)

NAME = "image-classification"
PEFT_TASK_TYPE = None
HEAD_NAMES = ("classifier", "score", "head")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MODEL_HINT = "Set model.name_or_path to a local model directory, or use model.config for a randomly initialised model."


# ------------------------------------------------------------------------- data
def load_raw(recipe) -> tuple[data_mod.Splits, list[str]]:
    """Train/eval splits with a ClassLabel label column, and the label names."""
    data = recipe.data
    if data.builtin == "digits":
        available = _digits()
    elif data.imagefolder:
        available = _imagefolder(Path(data.imagefolder))
    elif data.train_file:
        available = data_mod.load_file_splits(data)
    elif data.dataset:
        available = data_mod.load_hub_splits(data)
    else:
        raise UserInputError("data: no data source; set one of data.dataset, data.imagefolder, data.train_file, data.builtin")
    for name, ds in available.items():
        data_mod.require_columns(ds, {"data.image_column": data.image_column, "data.label_column": data.label_column})
        if data.train_file:
            available[name] = _resolve_image_paths(ds, data.image_column, Path(data.train_file).parent)
    splits = data_mod.choose_splits(available, data, recipe.seed, stratify=data.label_column)
    labels = data_mod.encode_labels(splits, data.label_column)
    return splits, labels


def _digits() -> dict[str, Any]:
    """scikit-learn's handwritten digits (1,797 real 8x8 scans) as RGB images."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray((img * 255 / 16).astype(np.uint8)).convert("RGB") for img in digits.images]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    return {"train": datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)}


def _imagefolder(root: Path) -> dict[str, Any]:
    """root/{train,validation}/<class>/*.jpg, or root/<class>/*.jpg (eval carved from it)."""
    import datasets

    if not root.is_dir():
        raise UserInputError(f"data.imagefolder: {root} is not a folder; point it at a folder with train/ and validation/ class sub-folders")
    split_dirs = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and p.name in ("train", *data_mod.EVAL_SPLIT_FALLBACKS)}
    if "train" not in split_dirs:
        split_dirs = {"train": root}
    classes = sorted({c.name for d in split_dirs.values() for c in d.iterdir() if c.is_dir()})
    if not classes:
        raise UserInputError(f"data.imagefolder: {root} has no class sub-folders (expected e.g. {root}/train/<class>/image.jpg)")
    feature = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    out = {}
    for split, folder in split_dirs.items():
        files = [
            (str(f), c) for c in classes if (folder / c).is_dir()
            for f in sorted((folder / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not files:
            raise UserInputError(f"data.imagefolder: no images under {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        paths, names = zip(*files)
        out[split] = datasets.Dataset.from_dict({"image": list(paths), "label": list(names)}, features=feature)
    return out


def _resolve_image_paths(ds, column: str, base: Path):
    """CSV/JSON image columns hold paths, relative to the data file's folder."""
    import datasets

    if isinstance(ds.features[column], datasets.Image):
        return ds
    missing = [p for p in ds[column][:1000] if not (base / p).is_file() and not Path(p).is_file()]
    if missing:
        raise UserInputError(f"data.image_column {column!r}: image file {missing[0]!r} not found (relative paths are read from {base})")
    ds = ds.map(lambda row: {column: str(Path(row[column]) if Path(row[column]).is_absolute() else base / row[column])})
    return ds.cast_column(column, datasets.Image())


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
    from torchvision import transforms as T

    resize, crop = _sizes(processor)
    mean = getattr(processor, "image_mean", None) or [0.5, 0.5, 0.5]
    std = getattr(processor, "image_std", None) or [0.5, 0.5, 0.5]
    normalize = T.Normalize(mean=mean, std=std)
    if train and augment:
        return T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    return T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), normalize])


def with_transforms(ds, processor, recipe, train: bool):
    tf = transforms(processor, train, augment=getattr(recipe.data, "augment", True))
    image_col, label_col = recipe.data.image_column, recipe.data.label_column

    def apply(batch: dict[str, list]) -> dict[str, list]:
        return {
            "pixel_values": [tf(img.convert("RGB")) for img in batch[image_col]],
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
    splits, _ = load_raw(recipe)
    ds = splits.train if split == "train" else splits.eval
    ds = data_mod.limit(ds, limit, recipe.seed)
    return with_transforms(ds, processor, recipe, train=False)


def synthetic_batch(processor, n: int = 4) -> dict[str, torch.Tensor]:
    """Random inputs of the right shape, when no data is reachable."""
    _, crop = _sizes(processor)
    return {"pixel_values": torch.randn(n, 3, *crop)}
