"""A classifier's label map, worked out in one place.

A run keeps its classes in ``adapter/label_map.json`` (``rundir.read_label_map``); a merged
model keeps them in its ``config.id2label`` (JSON turns the ids into strings). Every verb that
names classes (``eval``, ``predict``, ``merge``, ``serve``) asks :func:`resolve_labels`, and every
head that is built gets both directions from :func:`label_maps`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lora_cli.errors import UserInputError


def label_maps(labels: Sequence[str] | Mapping[Any, str]) -> tuple[dict[int, str], dict[str, int]]:
    """``(id2label, label2id)`` (what a classifier config holds) of class names in id order, or of
    an id -> name mapping (ids as ints or as the strings JSON makes of them)."""
    pairs = labels.items() if isinstance(labels, Mapping) else enumerate(labels)
    id2label = {int(i): str(name) for i, name in pairs}
    return id2label, {name: i for i, name in id2label.items()}


def config_labels(model: Any) -> dict[int, str]:
    """``model.config.id2label`` with int keys (empty when the model has none)."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    return {int(k): str(v) for k, v in id2label.items()}


def resolve_labels(saved: Mapping[Any, str] | None, model: Any = None) -> dict[int, str]:
    """The classes of a run or merged model: the saved label map, else the model config's.

    Empty when neither has one (a generative model); callers that need classes refuse that."""
    if saved:
        return {int(k): str(v) for k, v in saved.items()}
    return config_labels(model) if model is not None else {}


def require_labels(saved: Mapping[Any, str] | None, model: Any, where: object) -> dict[int, str]:
    """:func:`resolve_labels` for a verb that names classes: a run (``where``) without any is refused."""
    labels = resolve_labels(saved, model)
    if not labels:
        raise UserInputError(f"{where}: the run has no label map (adapter/label_map.json); re-train it")
    return labels
