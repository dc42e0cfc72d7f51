"""PNG plots: the confusion matrix of an evaluation, loss and accuracy curves of a run.

Matplotlib runs on the Agg backend (files only, no display), so plots work on servers.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lora_cli.atomic import atomic_file
from lora_cli.safe_text import plot_label, terminal_text

logger = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the figure beside the target, then rename: no half-written PNG on a crash.
    ``metadata``: PNG text entries (what wrote the figure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=fig.dpi, bbox_inches="tight", metadata=metadata)
    finally:
        fig.clf()
        _pyplot().close(fig)
    return path


def class_order(cm: np.ndarray) -> np.ndarray:
    """Classes by recall, best first (ties by support), so the errors gather bottom-right."""
    support = cm.sum(axis=1)
    recall = np.divide(np.diag(cm), support, out=np.zeros(len(cm)), where=support > 0)
    return np.lexsort((-support, -recall))


def plot_confusion_matrix(
    cm: np.ndarray, labels: Sequence[str], path: str | Path, title: str = "Confusion matrix"
) -> Path:
    """Row-normalised confusion matrix (each row: where that true class went).

    Rows and columns are sorted by per-class recall, best first. Cell values are written
    in the cells only for up to 25 classes; with more (Food-101 has 101) the figure grows
    with the class count and the labels shrink so every class name stays legible.

    Class names and the title are drawn literally (:func:`lora_cli.safe_text.plot_label`):
    a ``$`` in a class name never starts matplotlib's mathtext.
    """
    plt = _pyplot()
    cm = np.asarray(cm, dtype=np.float64)
    n = len(cm)
    order = class_order(cm)
    support = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, support, out=np.zeros_like(cm), where=support > 0)[np.ix_(order, order)]
    names = [plot_label(labels[i]) for i in order]

    side = min(max(5.0, 0.15 * n + 3.0), 24.0)  # inches: ~0.15 in (11 pt) per class
    fontsize = 10.0 if n <= 20 else max(4.0, 600.0 / n)
    fig, ax = plt.subplots(figsize=(side + 1.5, side), dpi=100)
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), names, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (sorted by recall, best first)")
    ax.set_title(plot_label(title))
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if norm[i, j] > 0:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=fontsize - 1,
                            color="white" if norm[i, j] > 0.5 else "black")
    return _save(fig, Path(path))


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl file; unreadable lines are skipped with a warning."""
    events = []
    with open(path, encoding="utf-8", errors="replace") as handle:  # a damaged byte spoils one line, not all
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):  # JSONDecodeError, absurd nesting
                logger.warning("%s:%d: not JSON, skipped", path, number)
                continue
            if isinstance(event, dict):
                events.append(event)
    return events


def _series(events: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, event in enumerate(events):
        value = event.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            continue
        x = event.get("step", event.get("global_step", event.get("epoch", i)))
        xs.append(float(x))
        ys.append(float(value))
    return xs, ys


def plot_training_curves(metrics_jsonl_path: str | Path, plots_dir: str | Path) -> list[Path]:
    """Write ``loss.png`` (train and eval loss by step) and ``accuracy.png`` (eval accuracy).

    Reads the Trainer's log events (``loss``, ``eval_loss``, ``eval_accuracy``, ``step``,
    ``epoch``). A plot with nothing to show is not written; returns the files written.
    A plot that fails to draw is a warning, never an error: the run's results matter more.
    """
    plt = _pyplot()
    events = read_metrics(metrics_jsonl_path)
    plots_dir = Path(plots_dir)
    written: list[Path] = []
    for filename, keys, ylabel in (
        ("loss.png", (("loss", "train"), ("eval_loss", "eval")), "loss"),
        ("accuracy.png", (("eval_accuracy", "eval"), ("train_accuracy", "train")), "accuracy"),
    ):
        curves = [(label, *_series(events, key)) for key, label in keys]
        curves = [c for c in curves if c[1]]
        if not curves:
            logger.info("no %s values in %s; %s not written", ylabel, metrics_jsonl_path, filename)
            continue
        fig = None
        try:
            fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
            for label, xs, ys in curves:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend()
            written.append(_save(fig, plots_dir / filename))
        except Exception as exc:  # noqa: BLE001 - a picture must never fail the run
            warnings.warn(f"could not draw {plots_dir / filename} ({type(exc).__name__}: {terminal_text(str(exc)[:200])})",
                          stacklevel=2)
            logger.debug("plot %s failed", filename, exc_info=True)
            if fig is not None:
                plt.close(fig)
    return written
