"""Top-k image classification of files, batch by batch, one error per bad file.

    model, processor, id2label = load_merged("merged/")        # or a loaded run's fields
    results = predict_files(model, processor, ["cake.jpg", "photos/"], id2label, top_k=5)
    console.print(predictions_table(results))

A file that cannot be read (or that the processor rejects) gets its own error in the
results; every other file is still predicted. Images are read by the loader training uses
(:func:`lora_cli.tasks.images.load_image`) and go through the task's eval transforms
(:func:`lora_cli.tasks.image_classification.eval_pixels`: decoded as the eval cache decodes, resize,
centre crop, normalise), so ``predict`` gives the model the tensors ``eval`` gives it.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_cli.atomic import atomic_file
from lora_cli.devices import model_device, model_dtype, resolve_device
from lora_cli.errors import LoraCliError, UserInputError
from lora_cli.tasks.image_classification import eval_pixels
from lora_cli.tasks.images import ImageLoadError, expand_inputs, load_image

logger = logging.getLogger(__name__)


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


def load_merged(directory: str | Path, device: str | torch.device | None = None):
    """Load a merged model directory (plain transformers): ``(model, processor, id2label)``."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise UserInputError(
            f"{directory} is not a model directory (no config.json); pass a folder written by `loracli merge`"
        )
    try:
        model = AutoModelForImageClassification.from_pretrained(directory)
        processor = AutoImageProcessor.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot load the model in {directory}: {exc}") from None
    model.to(resolve_device(device)).eval()
    return model, processor, label_map(model)


def label_map(model: nn.Module) -> dict[int, str]:
    """``config.id2label`` with int keys (it round-trips through JSON as strings)."""
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) or {}
    return {int(k): str(v) for k, v in id2label.items()}


def predict_files(
    model: nn.Module,
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
    files = expand_inputs(paths)
    id2label = dict(id2label) if id2label else label_map(model)
    results = [FilePrediction(file=str(f)) for f in files]
    model.eval()
    for start in range(0, len(files), batch_size):
        chunk = results[start : start + batch_size]
        images, owners = [], []
        for result in chunk:
            try:
                images.append(load_image(result.file))
                owners.append(result)
            except ImageLoadError as exc:
                result.error = exc.reason
        if images:
            _predict_batch(model, processor, images, owners, id2label, top_k)
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


def class_probabilities(model: nn.Module, processor: Any, images: Sequence[Any]) -> torch.Tensor:
    """Softmax over classes (float32, on the CPU) for a list of RGB PIL images."""
    batch = pixel_values(processor, images)
    with torch.inference_mode():
        logits = model(pixel_values=batch.to(model_device(model), model_dtype(model))).logits
    if not torch.isfinite(logits).all():
        raise LoraCliError("the model produced NaN/inf logits; the weights are broken (re-train or re-merge)")
    return logits.float().softmax(dim=-1).cpu()


# ---------------------------------------------------------------- renderers
def predictions_table(results: Sequence[FilePrediction], title: str | None = None):
    """A rich table: one row per file, one column per rank ("label: prob").

    File names, labels and errors are user data: control characters and bidi overrides
    are shown escaped (:func:`lora_cli.safe_text.terminal_text`), rich markup escaped."""
    from rich.markup import escape as _markup_escape
    from rich.table import Table

    from lora_cli.safe_text import terminal_text

    def escape(value: str) -> str:
        return _markup_escape(terminal_text(value))

    k = max((len(r.labels) for r in results), default=1)
    names = [r.file for r in results]
    try:
        common = os.path.commonpath([os.path.dirname(n) for n in names]) if len(names) > 1 else ""
    except ValueError:  # absolute and relative paths mixed
        common = ""
    if common:
        names = [os.path.relpath(n, common) for n in names]
        title = title or f"predictions for files in {common}"
    table = Table(title=escape(title) if title else None, show_lines=False)
    table.add_column("file", overflow="fold")
    for rank in range(1, k + 1):
        table.add_column(f"top-{rank}" if k > 1 else "prediction")
    for r, name in zip(results, names, strict=True):
        if r.ok:
            cells = [f"{escape(lab)}: {p:.3f}" for lab, p in zip(r.labels, r.probabilities, strict=True)]
            table.add_row(escape(name), *cells)
        else:
            table.add_row(escape(name), f"[red]error: {escape(r.error or '')}[/red]", *[""] * (k - 1))
    return table


def predictions_json(results: Sequence[FilePrediction]) -> list[dict[str, Any]]:
    """A list of ``{"file", "top_k": [{"label", "probability"}], "error"}`` objects."""
    return [r.to_dict() for r in results]


def write_predictions_csv(results: Sequence[FilePrediction], path: str | Path) -> Path:
    """One row per file: file, label_1, probability_1, ..., label_k, probability_k, error.

    Text cells are neutralised for spreadsheets (:func:`lora_cli.safe_text.csv_cell`: a
    leading ``=``/``+``/``-``/``@`` gets a ``'``, control characters are escaped); the raw
    values are in ``--json``."""
    from lora_cli.safe_text import csv_cell

    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise UserInputError(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise UserInputError(f"--csv {path} is a folder; give a file name such as predictions.csv")
    if path.exists() and path.resolve() in {Path(r.file).resolve() for r in results}:
        raise UserInputError(f"--csv {path} is one of the images being predicted; writing there would destroy it. "
                             "Give another file name, such as predictions.csv")
    k = max((len(r.labels) for r in results), default=0)
    header = ["file"]
    for rank in range(1, k + 1):
        header += [f"label_{rank}", f"probability_{rank}"]
    header.append("error")
    with atomic_file(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for r in results:
            row: list[Any] = [csv_cell(r.file)]
            for rank in range(k):
                if rank < len(r.labels):
                    row += [csv_cell(r.labels[rank]), f"{r.probabilities[rank]:.6f}"]
                else:
                    row += ["", ""]
            row.append(csv_cell(r.error or ""))
            writer.writerow(row)
    return path
