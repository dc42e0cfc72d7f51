"""Side-by-side numbers for finished runs (``loracli compare``, the end of ``loracli sweep``).

Each run directory gives one row, read from files `train` writes:

    adapter/adapter_config.json       method, rank, alpha
    adapter/adapter_model.safetensors file size; effective rank of the update (effective_rank.py)
    train.json                        wall time, samples/s, peak memory, trainable parameters
    eval.json                         accuracy and macro-F1, or perplexity / BLEU
    metrics.jsonl                     the curves of the overlaid figure (compare_plot.py)

Runs written before train.json existed fall back on the Trainer's own train_runtime and
train_samples_per_second in metrics.jsonl; whatever a run does not have is None ("n/a").
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from lora_cli import rundir as rd
from lora_cli.adapters.registry import get_method
from lora_cli.errors import UserInputError
from lora_cli.evaluation.effective_rank import adapter_effective_rank
from lora_cli.evaluation.plots import read_metrics
from lora_cli.safe_text import csv_cell, markdown_text, terminal_text

TRAIN_STATS_FILE = "train.json"
"""Training-loop wall time, throughput, peak memory and parameter counts (TrainStatsCallback)."""

ADAPTER_WEIGHTS = "adapter_model.safetensors"
NA = "n/a"

# (key, heading, kind): kind picks the formatting
COLUMNS = (
    ("run", "run", "text"),
    ("method", "method", "text"),
    ("rank_alpha", "rank/alpha", "text"),
    ("trainable_params", "trainable", "int"),
    ("trainable_percent", "trainable %", "pct"),
    ("adapter_bytes", "adapter size", "bytes"),
    ("effective_rank", "eff. rank", "float1"),
    ("accuracy", "accuracy", "float4"),
    ("macro_f1", "macro F1", "float4"),
    ("perplexity", "perplexity", "float2"),
    ("bleu", "BLEU", "float2"),
    ("wall_time_s", "train time s", "float1"),
    ("samples_per_second", "samples/s", "float1"),
    ("peak_memory_bytes", "peak memory", "bytes"),
)
METRIC_KEYS = ("accuracy", "macro_f1", "perplexity", "bleu")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def check_runs(run_dirs: list[Path]) -> list[Path]:
    """Every argument is a run directory, or one UserInputError lists those that are not."""
    if not run_dirs:
        raise UserInputError("pass one or more run directories, e.g. loracli compare runs/a runs/b")
    wrong = [p for p in run_dirs if not rd.is_run_dir(p)]
    if wrong:
        shown = ", ".join(terminal_text(p) for p in wrong)
        raise UserInputError(f"not a run directory (no {rd.RECIPE_FILE} and {rd.ENV_FILE}): {shown}; pass folders "
                             "written by `loracli train` (or `loracli sweep`)")
    for run in run_dirs:  # what a row and the figure read, never through a link out of the run
        rd.check_run_links(run, (rd.ADAPTER_DIR, TRAIN_STATS_FILE, rd.EVAL_FILE, rd.STATUS_FILE, rd.METRICS_FILE))
    return [Path(p) for p in run_dirs]


def method_and_rank(config: dict[str, Any]) -> tuple[str | None, str | None]:
    """("lora", "16/32") from an adapter_config.json, as its method's config class shows it (AdaLoRA:
    "init_r->target_r/alpha"; a method with no rank by its own size, or "-"); (type, None) for a
    PEFT type loracli does not know."""
    kind = str(config.get("peft_type", "")).lower() or None
    try:
        config_cls = get_method(kind).config_cls if kind else None
    except UserInputError:
        config_cls = None
    if config_cls is None:
        return kind, None
    return config_cls.shown_method(config), config_cls.size_label(config)


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """One row of the comparison; None where the run does not record a value."""
    adapter = run_dir / rd.ADAPTER_DIR
    method, rank = method_and_rank(_read_json(adapter / "adapter_config.json"))
    stats = _read_json(run_dir / TRAIN_STATS_FILE)
    evaluation = _read_json(run_dir / rd.EVAL_FILE)
    trainer = evaluation.get("trainer") if isinstance(evaluation.get("trainer"), dict) else {}
    status = rd.read_status(run_dir).get("state")
    row: dict[str, Any] = {"run": run_dir.name, "path": str(run_dir), "status": status, "method": method,
                           "rank_alpha": rank}
    weights = adapter / ADAPTER_WEIGHTS
    row["adapter_bytes"] = weights.stat().st_size if weights.is_file() else None
    row["effective_rank"] = row["effective_rank_layers"] = None
    if weights.is_file():
        try:
            found = adapter_effective_rank(weights)
        except Exception:  # noqa: BLE001 - a damaged adapter file is an n/a here, not a failed comparison
            found = None
        if found is not None:
            row["effective_rank"], row["effective_rank_layers"] = round(found[0], 3), found[1]
    for key in METRIC_KEYS:
        row[key] = _number(next((src[k] for src in (evaluation, trainer) for k in (key, f"eval_{key}") if k in src),
                                None))
    fallback = _trainer_totals(run_dir)
    for key in ("trainable_params", "trainable_percent", "wall_time_s", "samples_per_second", "peak_memory_bytes"):
        row[key] = _number(stats.get(key, fallback.get(key)))
    row["peak_memory_kind"] = stats.get("peak_memory_kind")
    return row


def _trainer_totals(run_dir: Path) -> dict[str, Any]:
    """train_runtime and train_samples_per_second the Trainer logs last (runs without train.json)."""
    path = run_dir / rd.METRICS_FILE
    if not path.is_file():
        return {}
    for event in reversed(read_metrics(path)):
        if "train_runtime" in event:
            return {"wall_time_s": event.get("train_runtime"), "samples_per_second": event.get("train_samples_per_second")}
    return {}


def compare_runs(run_dirs: list[Path]) -> list[dict[str, Any]]:
    return [summarize_run(p) for p in check_runs(run_dirs)]


def shown_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The columns to print: metric columns only where some run has a value."""
    return [c for c in COLUMNS if c[0] not in METRIC_KEYS or any(r.get(c[0]) is not None for r in rows)]


def format_cell(value: Any, kind: str) -> str:
    if value is None:
        return NA
    if kind == "int":
        return f"{int(value):,d}"
    if kind == "pct":
        return f"{value:.3f}"
    if kind == "bytes":
        return format_bytes(value)
    if kind.startswith("float"):
        return f"{value:.{kind[5:]}f}"
    return str(value)


def format_bytes(value: float) -> str:
    """``239.8 KiB``: a file size as the tables show it."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _label(row: dict[str, Any]) -> str:
    status = row.get("status")
    return row["run"] if status in (None, "completed") else f"{row['run']} ({status})"


def text_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headings and formatted cells (user text still raw: neutralise where it goes)."""
    columns = shown_columns(rows)
    cells = [[_label(r) if key == "run" else format_cell(r.get(key), kind) for key, _, kind in columns]
             for r in rows]
    return [heading for _, heading, _ in columns], cells


def markdown_table(rows: list[dict[str, Any]]) -> str:
    headings, cells = text_rows(rows)

    def line(values):  # every cell rendered as its text: no HTML, link, code span or extra cell
        return "| " + " | ".join(markdown_text(v) for v in values) + " |"

    body = [line(headings), "|" + "|".join("---" if i < 3 else "---:" for i in range(len(headings))) + "|"]
    return "\n".join(body + [line(c) for c in cells]) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    """Raw numbers (n/a where missing), every text cell through csv_cell."""
    keys = [key for key, _, _ in COLUMNS] + ["peak_memory_kind", "status", "path"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(keys)
    for row in rows:
        values = []
        for key in keys:
            value = row.get(key)
            values.append(NA if value is None else value if isinstance(value, (int, float)) else csv_cell(value))
        writer.writerow(values)
    return out.getvalue()


def rich_table(rows: list[dict[str, Any]], title: str = "Run comparison"):
    from rich.markup import escape
    from rich.table import Table

    headings, cells = text_rows(rows)
    table = Table(title=title, title_justify="left")
    for i, heading in enumerate(headings):
        table.add_column(heading, justify="left" if i < 3 else "right", no_wrap=i == 0)
    for row in cells:
        table.add_row(*(escape(terminal_text(v)) for v in row))
    return table
