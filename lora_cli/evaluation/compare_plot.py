"""The overlaid figure of ``loracli compare``: training loss and the eval metric, one line per run.

Left: training loss by step. Right: the first eval metric any run logged, in this order:
eval_accuracy, eval_macro_f1, eval_perplexity, eval_bleu, eval_loss. Run names are drawn
literally (:func:`lora_cli.safe_text.plot_label`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lora_cli import rundir as rd
from lora_cli.evaluation.plots import _pyplot, _save, read_metrics
from lora_cli.safe_text import plot_label

EVAL_CURVES = ("eval_accuracy", "eval_macro_f1", "eval_perplexity", "eval_bleu", "eval_loss")
FIGURE_KEY, FIGURE_VALUE = "loracli", "compare"
"""A PNG text entry every compare figure carries: the only kind of file compare writes over."""


def is_compare_figure(path: Path) -> bool:
    """``path`` is a PNG that ``loracli compare`` wrote (it carries :data:`FIGURE_KEY`)."""
    from PIL import Image

    try:
        with Image.open(path) as image:  # reads the header and the text chunks before the pixels
            return image.format == "PNG" and image.info.get(FIGURE_KEY) == FIGURE_VALUE
    except Exception:  # noqa: BLE001 - anything PIL cannot read is not our figure
        return False


def _curve(events: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for event in events:
        value, step = event.get(key), event.get("step")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and isinstance(step, (int, float)):
            xs.append(float(step))
            ys.append(float(value))
    return xs, ys


def plot_comparison(run_dirs: list[Path], labels: list[str], path: Path) -> Path | None:
    """Write the figure to ``path``; None (nothing written) when no run logged a curve."""
    events = {}
    for run, label in zip(run_dirs, labels):
        metrics_file = Path(run) / rd.METRICS_FILE
        events[label] = read_metrics(metrics_file) if metrics_file.is_file() else []
    eval_key = next((k for k in EVAL_CURVES if any(_curve(e, k)[0] for e in events.values())), None)
    if not any(_curve(e, "loss")[0] for e in events.values()) and eval_key is None:
        return None
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100)
    for label, run_events in events.items():
        for ax, key in ((left, "loss"), (right, eval_key)):
            if key is None:
                continue
            xs, ys = _curve(run_events, key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=plot_label(label))
    left.set_title("training loss")
    right.set_title(eval_key.removeprefix("eval_").replace("_", " ") if eval_key else "no eval metric logged")
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, Path(path), metadata={FIGURE_KEY: FIGURE_VALUE})
