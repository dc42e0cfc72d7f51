"""Data sources shared by every task: hub datasets, CSV/JSON(L) files, and split handling.

A task asks for raw splits (``train`` and ``eval``, HF ``datasets.Dataset`` objects);
everything here is about where rows come from, not what they mean. All checks run before
anything is written, so a bad data section costs no run directory.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lora_cli.errors import UserInputError
from lora_cli.hub import require_hub

logger = logging.getLogger(__name__)

EVAL_SPLIT_FALLBACKS = ("validation", "valid", "val", "test")


@dataclass
class Splits:
    train: Any
    eval: Any
    data: Any = None
    """The recipe's data section (its label policies), when :func:`choose_splits` made these."""
    sources: dict[str, str] = field(default_factory=dict)
    """``train`` / ``eval`` -> where those rows come from, for messages."""
    notes: dict[str, str] = field(default_factory=dict)
    """``train`` / ``eval`` -> what preparing them did beyond the row counts (rows packed), for
    ``train --dry-run`` and ``validate --data``; rows cut or left out are a warning of their own."""


def file_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".json", ".jsonl"):
        return "json"
    raise UserInputError(f"data file {path}: unsupported format {suffix!r}; use .csv, .tsv, .json or .jsonl")


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
    """Pick train/eval splits; carve eval from train (seeded) when there is none.

    ``stratify`` is the label column of a classification task: before anything is
    carved, its values are made one label type (:func:`canonical_label`) and rows without
    a label follow ``data.missing_labels``, with file and row in the messages.
    """
    if data.train_split not in available:
        raise UserInputError(
            f"data.train_split: no split {data.train_split!r} in the data; available: {', '.join(available)}"
        )
    train = available[data.train_split]
    names = [data.eval_split] if data.eval_split else []
    names += [n for n in EVAL_SPLIT_FALLBACKS if n not in names]
    eval_name = next((n for n in names if n in available and n != data.train_split), None)
    eval_ds = available[eval_name] if eval_name else None
    train_source = source_name(data, data.train_split)
    eval_source = source_name(data, eval_name) if eval_name else f"the validation rows carved from {train_source}"
    if stratify and stratify in train.column_names:
        policy = getattr(data, "missing_labels", "error")
        parts = [(train, train_source)] + ([(eval_ds, eval_source)] if eval_ds is not None else [])
        cleaned = clean_labels(parts, stratify, policy)
        train = cleaned[0]
        if eval_ds is not None:
            eval_ds = cleaned[1]
    if eval_ds is None:
        if len(train) < 2:
            raise UserInputError("the training data has fewer than 2 rows: nothing to split a validation set from")
        train, eval_ds = _carve(train, data.val_split, seed, stratify)
    return Splits(
        limit(train, data.max_train_samples, seed),
        limit(eval_ds, data.max_eval_samples, seed),
        data=data,
        sources={"train": train_source, "eval": eval_source},
    )


def _carve(train, val_split: float, seed: int, stratify: str | None):
    """(train, eval) carved from ``train``, stratified by the label column where every class
    has rows enough (string labels too, so each class lands in both parts)."""
    import datasets

    column = stratify if stratify and stratify in train.column_names else None
    if column is not None and not _is_class_label(train, column):
        feature = train.features[column]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            column = None
    if column is not None:
        keyed = train.select_columns([column]).add_column("__row__", list(range(len(train))))
        if not _is_class_label(keyed, column):
            keyed = keyed.class_encode_column(column)
        try:
            parts = keyed.train_test_split(test_size=val_split, seed=seed, stratify_by_column=column)
            return train.select(parts["train"]["__row__"]), train.select(parts["test"]["__row__"])
        except ValueError:  # a class with too few rows to stratify
            pass
    parts = train.train_test_split(test_size=val_split, seed=seed)
    return parts["train"], parts["test"]


def source_name(data, split: str) -> str:
    """Where one split's rows come from, as the user named it."""
    if getattr(data, "train_file", None):
        if split == "train":
            return str(data.train_file)
        if split == "validation" and data.validation_file:
            return str(data.validation_file)
    if getattr(data, "imagefolder", None):
        return str(Path(data.imagefolder) / split)
    if getattr(data, "builtin", None):
        return f"the builtin {data.builtin} data"
    if getattr(data, "dataset", None):
        return f"dataset {data.dataset} split {split!r}"
    return f"split {split!r}"


def row_ref(source: str, index: int) -> str:
    """Row ``index`` (0-based) of ``source`` as the user counts it."""
    suffix = Path(source).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return f"data row {index + 1} (line {index + 2})"
    if suffix == ".jsonl":
        return f"line {index + 1}"
    if suffix == ".json":
        return f"record {index + 1}"
    return f"row {index}"


def _refs(source: str, rows: list[int], shown: int = 5) -> str:
    text = ", ".join(row_ref(source, i) for i in rows[:shown])
    return text + (f" and {len(rows) - shown} more" if len(rows) > shown else "")


_WHOLE_NUMBER = re.compile(r"[+-]?(0|[1-9][0-9]*)(\.0*)?")


def canonical_label(value: Any) -> str | None:
    """One label value as its class name; None when there is no label.

    Whole numbers are one class whatever their type: ``1``, ``1.0``, ``"1"`` and ``"1.0"``
    are all class ``"1"`` (strings with leading zeros, like ``"01"``, stay as written).
    Other numbers keep their decimal form (``0.5`` -> ``"0.5"``), strings are stripped of
    surrounding spaces; ``None``, NaN and empty strings are missing. Booleans become
    ``"True"`` / ``"False"`` (:func:`clean_labels` refuses them mixed with other labels).
    """
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return "True" if value else "False"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return str(float(value))
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if isinstance(value, (list, dict, tuple)):
        raise TypeError(f"a {type(value).__name__} ({value!r:.40})")
    text = str(value).strip()
    if not text:
        return None
    if _WHOLE_NUMBER.fullmatch(text):
        return str(int(float(text))) if "." in text else str(int(text))
    return text


def clean_labels(parts: list[tuple[Any, str]], column: str, policy: str) -> list[Any]:
    """Each ``(dataset, source)`` with ``column`` as canonical class names (strings).

    Rows without a label raise (``policy`` "error") or are dropped with a warning
    ("drop"). ClassLabel columns keep their type; their missing value is -1.
    """
    import datasets

    out, kinds = [], {}
    for ds, source in parts:
        feature = ds.features[column]
        values = ds[column]
        if isinstance(feature, datasets.ClassLabel):
            missing = [i for i, v in enumerate(values) if v is None or v < 0]
            labels = None
        else:
            labels, missing = [], []
            for i, value in enumerate(values):
                try:
                    label = canonical_label(value)
                except TypeError as exc:
                    raise UserInputError(
                        f"{source}: {row_ref(source, i)}: the label in column {column!r} is {exc}, not a class name; "
                        "write one label (text or a number) per row"
                    ) from None
                if label is None:
                    missing.append(i)
                else:
                    kind = "bool" if isinstance(value, (bool, np.bool_)) else "other"
                    kinds.setdefault(kind, (source, i, value))
                labels.append(label)
        if missing:
            count = f"{len(missing)} of its {len(values)} rows" if len(missing) > 1 else "1 row"
            rows = f"in column {column!r} ({_refs(source, missing)})"
            if policy != "drop":
                verb = "have" if len(missing) > 1 else "has"
                raise UserInputError(
                    f"data.missing_labels: {source}: {count} {verb} no label {rows}. Fill in the labels, "
                    "remove those rows, or set data.missing_labels: drop to leave them out"
                )
            logger.warning("data.missing_labels: drop: left out %s of %s with no label %s", count, source, rows)
        if labels is not None:
            ds = ds.remove_columns([column]).add_column(column, labels, feature=datasets.Value("string"))
        if missing:
            gone = set(missing)
            ds = ds.select([i for i in range(len(ds)) if i not in gone])
        out.append(ds)
    if len(kinds) > 1:
        (bsource, brow, bvalue), (osource, orow, ovalue) = kinds["bool"], kinds["other"]
        raise UserInputError(
            f"data.label_column {column!r}: mixes true/false ({bsource} {row_ref(bsource, brow)}: {bvalue!r}) "
            f"with other labels ({osource} {row_ref(osource, orow)}: {ovalue!r}); true/false would be "
            "confused with 1/0. Write every label of the column the same way (e.g. yes/no, or 1/0)"
        )
    for ds, (_, source) in zip(out, parts, strict=True):
        if len(ds) == 0:
            raise UserInputError(f"{source}: no rows with a label left in column {column!r}")
    return out


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


def require_text(ds, columns: dict[str, str | None], source: str, where) -> None:
    """Each of ``columns`` (recipe key -> column) holds one text per row, not lists or records.

    ``where(key)`` gives the recipe's ``file:line: data.<key>`` for the message. A column of
    chat messages named as text would otherwise train on the Python form of the list.
    """
    import datasets

    for key, column in columns.items():
        if column is None or column not in ds.column_names:
            continue
        feature = ds.features[column]
        if isinstance(feature, datasets.Value) and feature.dtype not in ("binary", "large_binary"):
            continue
        values = ds[column]
        index = next((i for i, v in enumerate(values) if v is not None), 0)
        value = values[index] if values else None
        chat = isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)
        kind = "lists of messages" if chat else (f"{type(value).__name__} values" if value is not None else "no text")
        fix = (
            f"for chat data set data.format: messages (with data.messages_column: {column}) instead of {key}"
            if chat else f"point {key} at a column holding one text per row"
        )
        raise UserInputError(
            f"{where(key.split('.', 1)[-1])}: column {column!r} of {source} holds {kind}, not text "
            f"({row_ref(source, index)}: {str(value)[:60]!r}); {fix}"
        )


def encode_labels(splits: Splits, column: str) -> list[str]:
    """Make ``column`` a ClassLabel in both splits (same mapping); return the label names.

    The classes are the training split's. Validation rows of a class the training data
    lacks follow ``data.unknown_eval_labels``: "error" names the classes and where they
    are, "drop" leaves those rows out with a warning.
    """
    import datasets

    data = splits.data
    train_source = splits.sources.get("train", "the training data")
    eval_source = splits.sources.get("eval", "the validation data")
    feature = splits.train.features[column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    else:
        if not isinstance(feature, datasets.Value) or feature.dtype not in ("string", "large_string"):
            splits.train, splits.eval = clean_labels(
                [(splits.train, train_source), (splits.eval, eval_source)], column, "error"
            )
        names = sorted(set(splits.train[column]))
        eval_values = splits.eval[column]
        known = set(names)
        unknown = sorted({v for v in eval_values if v not in known})
        if unknown:
            rows = [i for i, v in enumerate(eval_values) if v not in known]
            shown = ", ".join(repr(v) for v in unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            where = f"{len(rows)} validation row(s) of {eval_source} have label(s) {shown} that {train_source} never has"
            if getattr(data, "unknown_eval_labels", "error") == "drop":
                logger.warning("data.unknown_eval_labels: drop: left out %s", where)
                splits.eval = splits.eval.select([i for i, v in enumerate(eval_values) if v in known])
                if len(splits.eval) == 0:
                    raise UserInputError(f"data.unknown_eval_labels: no validation rows left: {where}")
            else:
                carved = "carved from" in eval_source
                fix = (
                    "Give each class at least 2 rows so both splits hold it, or provide data.validation_file"
                    if carved else "Add training rows for them, or remove them from the validation data"
                )
                raise UserInputError(
                    f"data.unknown_eval_labels: {where}, so the model could never predict them. {fix}, "
                    "or set data.unknown_eval_labels: drop to leave those rows out"
                )
        feature = datasets.ClassLabel(names=names)
        for attr in ("train", "eval"):
            setattr(splits, attr, getattr(splits, attr).cast_column(column, feature))
    if isinstance(splits.eval.features[column], datasets.ClassLabel) and splits.eval.features[column].names != names:
        raise UserInputError(
            f"data.label_column: the validation split's classes differ from the training split's "
            f"({splits.eval.features[column].names[:5]}... vs {names[:5]}...)"
        )
    if len(names) < 2:
        raise UserInputError(f"data.label_column {column!r}: found {len(names)} class(es); classification needs at least 2")
    return names


def classes_without_rows(ds, column: str, names: list[str]) -> list[str]:
    """Classes of a ClassLabel ``column`` with no row in ``ds``."""
    counts = np.bincount(np.asarray(ds[column], dtype=np.int64), minlength=len(names)) if len(ds) else np.zeros(len(names))
    return [name for name, count in zip(names, counts, strict=False) if count == 0]
