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
from lora_cli.hf_names import classification_heads
from lora_cli.hub import require_hub
from lora_cli.recipe import ImageData, ModelSection
from lora_cli.task_kinds import IMAGE_CLASSIFICATION, TASK_KINDS
from lora_cli.tasks import data as data_mod
from lora_cli.tasks import image_data, images

logger = logging.getLogger(__name__)

KIND = TASK_KINDS[IMAGE_CLASSIFICATION]
generation_metrics = None
classify_text = None
generate = None
preprocess_logits_for_metrics = None
MODEL_HINT = "Set model.name_or_path to a local model directory, or use model.config for a randomly initialised model."


# ------------------------------------------------------------------------- data
def load_raw(data: ImageData, seed: int) -> tuple[data_mod.Splits, list[str]]:
    """Train/eval splits with a ClassLabel label column, and the label names.

    Every check runs here, before ``train`` writes anything: the folder layout, every
    image path of a CSV/JSONL file, the labels (``data.missing_labels``,
    ``data.unknown_eval_labels``), and a decode check of every image of both splits
    (``data.bad_images``). The image column stays undecoded (``{"bytes", "path"}``);
    the transforms decode each image with :func:`lora_cli.tasks.images.load_image`.
    """
    splits, labels = image_data.load_splits(data, seed)
    for attr, what in (("train", "training"), ("eval", "validation")):
        setattr(splits, attr, images.check_dataset(getattr(splits, attr), data.image_column, data.bad_images, what))
    image_data.warn_classes_without_training_rows(splits, data.label_column, labels)
    return splits, labels


# ------------------------------------------------------------- processor, model
def load_processor(model: ModelSection, source: str | Path | None = None):
    """The model's own image processor (hub/local), or a ViT one sized from model.config."""
    from transformers import AutoImageProcessor, ViTImageProcessor

    path = source or model.name_or_path
    if path:
        require_hub(str(path), "model.name_or_path", local_hint=MODEL_HINT)
        return AutoImageProcessor.from_pretrained(str(path), revision=model.revision, trust_remote_code=model.trust_remote_code)
    size = int(model.config.get("image_size", 224))
    kwargs = {"size": {"height": size, "width": size}} | dict(model.processor or {})
    return ViTImageProcessor(**kwargs)


def build_model(model: ModelSection, labels: list[str], source: str | Path | None = None):
    from transformers import AutoConfig, AutoModelForImageClassification

    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
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
    return classification_heads(model)


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


def with_transforms(ds, processor, data: ImageData, train: bool):
    """Rows as ``{"pixel_values", "labels"}``: each image decoded by the shared loader, then ``transforms``."""
    tf = transforms(processor, train, augment=data.augment)
    image_col, label_col = data.image_column, data.label_column

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


def prepare(splits: data_mod.Splits, processor, data: ImageData, seed: int):
    train = with_transforms(splits.train, processor, data, True)
    if data.augment:
        train = SeededAugmentation(train, seed)
    return train, with_transforms(splits.eval, processor, data, False)


def make_collator(processor=None, data: ImageData | None = None):
    """Stacks image tensors and labels (the processor has no say)."""
    return collate


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


def eval_dataset(data: ImageData, seed: int, processor, split: str = "validation", limit: int | None = None):
    """The recipe's evaluation data with eval transforms (for `loracli eval` / merge checks)."""
    splits, _ = image_data.load_splits(data, seed)
    ds = splits.train if split == "train" else splits.eval
    ds = data_mod.limit(ds, limit, seed)
    what = "training" if split == "train" else "validation"
    ds = images.check_dataset(ds, data.image_column, data.bad_images, what)  # only the rows used
    return with_transforms(ds, processor, data, train=False)


def synthetic_batch(processor, n: int = 4) -> dict[str, torch.Tensor]:
    """Random inputs of the right shape, when no data is reachable."""
    _, crop = _sizes(processor)
    return {"pixel_values": torch.randn(n, 3, *crop)}
