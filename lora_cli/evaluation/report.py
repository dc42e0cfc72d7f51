"""Evaluate an image classifier on a dataset: accuracy, macro-F1, per-class scores, loss.

    report = evaluate(model, dataset, task.collate, id2label, batch_size=32)
    write_report(report, run_dir)               # eval.json + plots/confusion_matrix.png
    console.print(*report_tables(report))

Report keys: ``num_samples``, ``num_classes``, ``accuracy`` (top-1), ``top_k`` and
``top_k_accuracy`` (k = 5, or the number of classes when there are fewer than 5, in which
case it is trivially 1.0), ``macro_f1``, ``loss`` (mean cross-entropy of the logits),
``per_class`` (precision, recall, f1, support), ``most_confused`` (the largest
off-diagonal cells), ``confusion_matrix`` and ``predictions`` (index, label, predicted,
confidence per sample, in dataset order).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from lora_cli.atomic import write_text
from lora_cli.devices import model_device, model_dtype
from lora_cli.errors import LoraCliError, UserInputError
from lora_cli.evaluation import metrics
from lora_cli.evaluation.plots import plot_confusion_matrix
from lora_cli.safe_text import rich_text, terminal_text

TOP_K = 5

logger = logging.getLogger(__name__)


def evaluate(
    model: nn.Module,
    dataset: Any,
    collate: Callable[[list], Mapping[str, Any]],
    id2label: Mapping[int, str],
    batch_size: int = 32,
) -> dict[str, Any]:
    """Run ``model`` over ``dataset`` (items with ``pixel_values`` and ``labels``) and score it."""
    if len(dataset) == 0:
        raise UserInputError("the evaluation split is empty; check data paths and --limit")
    device, dtype = model_device(model), model_dtype(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    all_logits, all_labels = [], []
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            labels = batch["labels"]
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            inputs = {
                k: v.to(device, dtype) if torch.is_tensor(v) and v.is_floating_point() else
                (v.to(device) if torch.is_tensor(v) else v)
                for k, v in inputs.items()
            }
            logits = model(**inputs).logits.float().cpu()
            all_logits.append(logits)
            all_labels.append(torch.as_tensor(labels).reshape(-1).cpu())
    return checked_score(torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy(), id2label)


def checked_score(logits: np.ndarray, labels: np.ndarray, id2label: Mapping[int, str]) -> dict[str, Any]:
    """:func:`score` of logits a model produced (here or in the Trainer's evaluation loop), after
    checking that they fit the label map and are finite and that the labels are class indices."""
    id2label = {int(k): str(v) for k, v in id2label.items()}
    num_classes = len(id2label)
    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise LoraCliError(
            f"the model outputs {logits.shape[-1]} classes but the label map has {num_classes}; "
            "the adapter's head does not match this run's labels"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserInputError(f"dataset labels must be in 0..{num_classes - 1}; found {labels.min()}..{labels.max()}")
    if not np.isfinite(logits).all():
        raise LoraCliError("the model produced NaN/inf logits during evaluation; the weights are broken")
    return score(logits, labels, id2label)


def score(logits: np.ndarray, labels: np.ndarray, id2label: Mapping[int, str]) -> dict[str, Any]:
    """The report for given logits (N, C) and integer labels (N,)."""
    num_classes = logits.shape[1]
    preds = logits.argmax(axis=1)
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    cm = metrics.confusion_matrix(labels, preds, num_classes)
    scores = metrics.per_class_scores(cm)
    k = min(TOP_K, num_classes)
    return {
        "num_samples": int(len(labels)),
        "num_classes": int(num_classes),
        "accuracy": float((preds == labels).mean()),
        "top_k": k,
        "top_k_accuracy": metrics.top_k_accuracy(logits, labels, k),
        "macro_f1": metrics.macro_f1(cm),
        "loss": metrics.cross_entropy(logits, labels),
        "per_class": [
            {
                "label": id2label.get(i, str(i)),
                "precision": float(scores["precision"][i]),
                "recall": float(scores["recall"][i]),
                "f1": float(scores["f1"][i]),
                "support": int(scores["support"][i]),
            }
            for i in range(num_classes)
        ],
        "most_confused": metrics.most_confused(cm, id2label),
        "confusion_matrix": cm.tolist(),
        "predictions": [
            {"index": i, "label": int(y), "predicted": int(p), "confidence": round(float(c), 6)}
            for i, (y, p, c) in enumerate(zip(labels, preds, probs.max(axis=1), strict=True))
        ],
    }


def write_report(report: Mapping[str, Any], out_dir: str | Path, name: str = "eval") -> dict[str, Path]:
    """Write ``<out_dir>/<name>.json`` and ``<out_dir>/plots/confusion_matrix[_<suffix>].png``
    (and ``<name>_predictions.jsonl`` from a generative report's ``generations``).

    ``name`` "eval" gives ``eval.json`` + ``confusion_matrix.png``; "eval_base" gives
    ``eval_base.json`` + ``confusion_matrix_base.png``, so variants do not overwrite the run's
    own evaluation.

    The JSON is written first: a plot that fails (an odd class name, a font, a full disk)
    is a warning and leaves the report in place; the returned dict then has no
    ``confusion_matrix`` entry.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = name[len("eval"):] if name.startswith("eval") else f"_{name}"
    path = out_dir / f"{name}.json"
    generations = report.get("generations")  # generated text per example: a file of its own
    report = {k: v for k, v in report.items() if k != "generations"}
    write_text(path, json.dumps(report, indent=2) + "\n")
    written: dict[str, Path] = {"json": path}
    if generations is not None:
        written["predictions"] = write_predictions(generations, out_dir, name)
    if "confusion_matrix" in report:  # classification reports only
        labels = [c["label"] for c in report["per_class"]]
        png = out_dir / "plots" / f"confusion_matrix{suffix}.png"
        try:
            written["confusion_matrix"] = plot_confusion_matrix(
                np.asarray(report["confusion_matrix"]),
                labels,
                png,
                title=f"Confusion matrix (accuracy {report['accuracy']:.3f}, n={report['num_samples']})",
            )
        except Exception as exc:  # noqa: BLE001 - a picture must never cost the report
            warnings.warn(
                f"could not draw {png} ({type(exc).__name__}: {terminal_text(str(exc)[:200])}); {path} is written, "
                "the plot is not. Run `loracli --debug eval RUN` for the traceback",
                stacklevel=2,
            )
            logger.debug("confusion matrix plot failed", exc_info=True)
    return written


def write_predictions(rows: list[Mapping[str, Any]], out_dir: str | Path, name: str = "eval") -> Path:
    """``<out_dir>/<name>_predictions.jsonl``: one generated example per line (input, reference,
    prediction), for a person to read beside the scores."""
    path = Path(out_dir) / f"{name}_predictions.jsonl"
    write_text(path, "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows))
    return path


def evaluate_lm(model: nn.Module, dataset: Any, collate: Callable[[list], Mapping[str, Any]], batch_size: int = 8) -> dict[str, Any]:
    """Token-weighted mean loss and perplexity of a causal or seq2seq LM over ``dataset``.

    The model's own loss is a per-token mean within a batch; weighting each batch by its
    count of predicted tokens (labels != -100, minus the shift for causal LMs) gives the
    mean over every predicted token of the split.
    """
    if len(dataset) == 0:
        raise UserInputError("the evaluation split is empty; check data paths and --limit")
    device = model_device(model)
    causal = not getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    # prompt learning on a causal LM: the last virtual token predicts labels[0] too
    shifted = causal and not getattr(model, "predicts_first_label", False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    total_loss, total_tokens = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            labels = batch["labels"][:, 1:] if shifted else batch["labels"]
            tokens = int((labels != -100).sum())
            if tokens == 0:
                continue
            loss = float(model(**batch).loss)
            if not np.isfinite(loss):
                raise LoraCliError("the model produced a NaN/inf loss during evaluation; the weights are broken")
            total_loss += loss * tokens
            total_tokens += tokens
    if total_tokens == 0:
        raise UserInputError("the evaluation split has no target tokens (every label is masked)")
    mean = total_loss / total_tokens
    return {"num_samples": len(dataset), "num_tokens": total_tokens, "loss": mean, "perplexity": float(np.exp(mean))}


def report_tables(report: Mapping[str, Any], worst: int = 10) -> list[Any]:
    """Rich tables: the summary, the weakest classes, the most-confused pairs."""
    from rich.table import Table

    escape = rich_text  # class names are user data: no control characters, no markup

    if "per_class" not in report:  # a language-model report: one table of numbers
        table = Table(title="evaluation", show_header=False)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in ("num_samples", "num_tokens", "loss", "perplexity", "bleu", "chrf"):
            if key in report:
                value = report[key]
                table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        return [table]

    overview = Table(title="evaluation", show_header=False)
    overview.add_column("metric")
    overview.add_column("value", justify="right")
    overview.add_row("samples", str(report["num_samples"]))
    overview.add_row("classes", str(report["num_classes"]))
    overview.add_row("accuracy (top-1)", f"{report['accuracy']:.4f}")
    overview.add_row(f"top-{report['top_k']} accuracy", f"{report['top_k_accuracy']:.4f}")
    overview.add_row("macro-F1", f"{report['macro_f1']:.4f}")
    overview.add_row("loss", f"{report['loss']:.4f}")
    tables = [overview]

    present = [c for c in report["per_class"] if c["support"] > 0]
    weakest = sorted(present, key=lambda c: (c["f1"], c["label"]))[:worst]
    if weakest:
        per = Table(title=f"weakest {len(weakest)} classes (of {len(report['per_class'])})")
        for col in ("class", "precision", "recall", "f1", "support"):
            per.add_column(col, justify="left" if col == "class" else "right")
        for c in weakest:
            per.add_row(escape(c["label"]), f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}",
                        str(c["support"]))
        tables.append(per)

    if report["most_confused"]:
        conf = Table(title="most confused (true -> predicted)")
        for col in ("true", "predicted", "count", "share of true class"):
            conf.add_column(col, justify="right" if col in ("count", "share of true class") else "left")
        for pair in report["most_confused"]:
            conf.add_row(escape(pair["true"]), escape(pair["predicted"]), str(pair["count"]), f"{pair['rate']:.1%}")
        tables.append(conf)
    return tables


def summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report without the bulky per-sample and matrix parts (for --json output)."""
    return {k: v for k, v in report.items() if k not in ("predictions", "generations", "confusion_matrix")}
