"""Data sources shared by every task: hub datasets, CSV/JSON(L) files, and split handling.

A task asks for raw splits (``train`` and ``eval``, HF ``datasets.Dataset`` objects);
everything here is about where rows come from, not what they mean. All checks run before
anything is written, so a bad data section costs no run directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_cli.errors import UserInputError
from lora_cli.hub import require_hub

logger = logging.getLogger(__name__)

EVAL_SPLIT_FALLBACKS = ("validation", "valid", "val", "test")


@dataclass
class Splits:
    train: Any
    eval: Any


def file_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".json", ".jsonl"):
        return "json"
    raise UserInputError(f"data file {path}: unsupported format {suffix!r}; use .csv, .json or .jsonl")


def load_file_splits(data) -> dict[str, Any]:
    """train_file / validation_file -> {"train": ds, "validation": ds}."""
    import datasets

    files = {"train": data.train_file}
    if data.validation_file:
        files["validation"] = data.validation_file
    fmt = {file_format(f) for f in files.values()}
    if len(fmt) > 1:
        raise UserInputError("data.train_file and data.validation_file must have the same format (both CSV or both JSON)")
    kwargs = {"delimiter": "\t"} if any(str(f).endswith(".tsv") for f in files.values()) else {}
    try:
        loaded = datasets.load_dataset(fmt.pop(), data_files={k: str(v) for k, v in files.items()}, **kwargs)
    except Exception as exc:  # malformed CSV/JSON: say which file
        raise UserInputError(f"could not read the data files {list(files.values())}: {exc}") from exc
    return dict(loaded)


def load_hub_splits(data) -> dict[str, Any]:
    import datasets

    require_hub(
        data.dataset,
        "data.dataset",
        repo_type="dataset",
        local_hint="Use data.imagefolder, data.train_file or data.builtin for local data.",
    )
    try:
        loaded = datasets.load_dataset(data.dataset, data.dataset_config)
    except Exception as exc:
        raise UserInputError(f"data.dataset: could not load {data.dataset!r}: {exc}") from exc
    return dict(loaded)


def choose_splits(available: dict[str, Any], data, seed: int, stratify: str | None = None) -> Splits:
    """Pick train/eval splits; carve eval from train (seeded) when there is none."""
    if data.train_split not in available:
        raise UserInputError(
            f"data.train_split: no split {data.train_split!r} in the data; available: {', '.join(available)}"
        )
    train = available[data.train_split]
    names = [data.eval_split] if data.eval_split else []
    names += [n for n in EVAL_SPLIT_FALLBACKS if n not in names]
    eval_ds = next((available[n] for n in names if n in available and n != data.train_split), None)
    if eval_ds is None:
        if len(train) < 2:
            raise UserInputError("the training data has fewer than 2 rows: nothing to split a validation set from")
        kwargs = {}
        if stratify and _is_class_label(train, stratify):
            kwargs["stratify_by_column"] = stratify
        try:
            parts = train.train_test_split(test_size=data.val_split, seed=seed, **kwargs)
        except ValueError:  # too few rows per class to stratify
            parts = train.train_test_split(test_size=data.val_split, seed=seed)
        train, eval_ds = parts["train"], parts["test"]
    return Splits(limit(train, data.max_train_samples, seed), limit(eval_ds, data.max_eval_samples, seed))


def limit(ds, n: int | None, seed: int):
    """A seeded random subset of ``n`` rows (sorted sources, e.g. folders, are class-ordered)."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def _is_class_label(ds, column: str) -> bool:
    import datasets

    return isinstance(ds.features.get(column), datasets.ClassLabel)


def require_columns(ds, columns: dict[str, str | None]) -> None:
    """``columns`` maps recipe key -> column name; all must exist in ``ds``."""
    have = list(ds.column_names)
    for key, column in columns.items():
        if column is not None and column not in have:
            raise UserInputError(
                f"{key}: the data has no column {column!r}; its columns are {', '.join(have)}. "
                f"Set {key} to one of them."
            )


def encode_labels(splits: Splits, column: str) -> list[str]:
    """Make ``column`` a ClassLabel in both splits (same mapping); return the label names."""
    import datasets

    feature = splits.train.features[column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    else:
        values = sorted({str(v) for v in splits.train[column]} | {str(v) for v in splits.eval[column]})
        names = values
        feature = datasets.ClassLabel(names=names)
        for attr in ("train", "eval"):
            ds = getattr(splits, attr)
            ds = ds.map(lambda row: {column: str(row[column])}).cast_column(column, feature)
            setattr(splits, attr, ds)
    if isinstance(splits.eval.features[column], datasets.ClassLabel) and splits.eval.features[column].names != names:
        raise UserInputError(
            f"data.label_column: the validation split's classes differ from the training split's "
            f"({splits.eval.features[column].names[:5]}... vs {names[:5]}...)"
        )
    if len(names) < 2:
        raise UserInputError(f"data.label_column {column!r}: found {len(names)} class(es); classification needs at least 2")
    return names
