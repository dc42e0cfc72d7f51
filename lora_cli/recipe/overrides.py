"""Command-line overrides: ``a.b.c=value`` items, YAML-typed, applied after ``extends``;
``~a.b.c`` removes a key (it then takes its default), as in Hydra.

Values are read exactly as recipe files are (:mod:`lora_cli.recipe.yamlio`: YAML 1.2 core
types, so ``training.save_strategy=no`` is the string ``'no'``; the same size, alias and
depth limits).

Each key must exist in the recipe schema (free-form mappings such as ``model.config`` and
dict-valued training fields accept any sub-key); a typo is reported with the right key.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from lora_cli.errors import did_you_mean
from lora_cli.recipe.data import data_section_for
from lora_cli.recipe.errors import Location, Reporter
from lora_cli.recipe.schema import ModelSection, Recipe

FREE_FORM = {("model", "config"), ("model", "processor"), ("model", "quantization")}
"""Mappings whose sub-keys an override may set one by one (the section checks them afterwards)."""


REMOVE = object()
"""The value of a ``~key.path`` item: take the key out of the recipe."""


def parse_override(item: str) -> tuple[tuple[str, ...], Any] | str:
    """(key path, value or REMOVE), or an error message for a malformed item."""
    from lora_cli.recipe.yamlio import LimitError, parse_value

    if isinstance(item, str) and item.startswith("~"):
        if "=" in item:
            return "removes a key and takes no value: write ~key.path (or key.path=value to set it)"
        parts = tuple(item[1:].strip().split("."))
        if any(not p for p in parts):
            return "has an empty key (use e.g. ~training.deepspeed)"
        return parts, REMOVE
    if not isinstance(item, str) or "=" not in item:
        return "is not of the form key.path=value (or ~key.path to remove a key)"
    key, text = item.split("=", 1)
    parts = tuple(key.strip().split("."))
    if not key.strip() or any(not p for p in parts):
        return "has an empty key (use e.g. training.learning_rate=1e-3)"
    try:
        value = parse_value(text)
    except LimitError as exc:
        return f"has a value that is past a recipe limit: it {exc.message}"
    except yaml.YAMLError as exc:
        return f"has a value that is not valid YAML ({' '.join(str(exc).split())})"
    return parts, value


def _known_children(parent: tuple[str, ...], data: dict) -> list[str] | None:
    """Valid keys under ``parent``; None when any key is allowed there."""
    if parent == ():
        return [*Recipe.model_fields]
    if parent == ("model",):
        return [*ModelSection.model_fields]
    if parent == ("data",):
        return [*data_section_for(data.get("task")).model_fields]
    if parent == ("training",):
        from lora_cli.recipe.training import training_fields

        return [*training_fields()]
    if parent == ("adapter",):
        from lora_cli.recipe.adapter import RECIPE_ONLY, allowed_fields, resolve_method

        adapter = data.get("adapter") if isinstance(data.get("adapter"), dict) else {}
        method, _, _ = resolve_method(adapter.get("method", "lora"))
        return None if method is None else ["method", *allowed_fields(method), *RECIPE_ONLY]
    return None


def _leaf_at(parts: tuple[str, ...]) -> int:
    """How many leading parts the schema checks (deeper parts are free-form)."""
    if parts[0] in ("model", "data", "adapter", "training"):
        return 2
    return 1


def check_key(parts: tuple[str, ...], data: dict) -> str | None:
    """A did-you-mean hint when ``parts`` is not a recipe key, else None."""
    if parts[0] == "extends":
        return "extends cannot be overridden: it is resolved before overrides apply"
    depth = _leaf_at(parts)
    for i in range(min(depth, len(parts))):
        known = _known_children(parts[:i], data)
        if known is None:
            return None
        if parts[i] not in known:
            guess = did_you_mean(parts[i], known, prefix=".".join(parts[:i]) + "." if i else "")
            if guess:
                return guess
            if parts[:i] == ("training",):
                return "training keys are transformers.TrainingArguments field names"
            return f"valid keys here: {', '.join(known)}"
    if len(parts) > depth or (len(parts) > 1 and depth == 1):
        if parts[:2] in FREE_FORM or parts[0] in ("adapter", "training"):
            return None
        return f"{'.'.join(parts[:depth])} has no sub-keys"
    return None


def apply_overrides(data: dict, locations: dict, items, report: Reporter) -> dict:
    """Apply every well-formed, known override to a copy of ``data``; report the rest."""
    data = copy.deepcopy(data)
    parsed = []
    for item in items:
        result = parse_override(item)
        where = Location(override=str(item))
        if isinstance(result, str):
            report.problems.append(_override_problem(item, result, where))
            continue
        parsed.append((item, *result))
    # adapter.method may itself be overridden: set it first so field names are checked against it
    parsed.sort(key=lambda p: p[1] != ("adapter", "method"))
    for item, parts, value in parsed:
        where = Location(override=item)
        # removing a key the recipe sets is always well-formed, even one the (overridden) method does not take
        hint = None if value is REMOVE and _is_set(data, parts) else check_key(parts, data)
        if hint is not None:
            report.problems.append(_override_problem(item, "names a key that is not in the recipe schema", where, hint))
            continue
        if value is REMOVE:
            _remove(data, locations, parts, item, where, report)
            continue
        node = data
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                report.problems.append(
                    _override_problem(item, f"{'.'.join(parts[: i + 1])} is not a mapping", where)
                )
                break
            node = node[part]
        else:
            node[parts[-1]] = value
            for path in [p for p in locations if p[: len(parts)] == parts]:
                del locations[path]
            _mark(parts, value, where, locations)
            for i in range(1, len(parts)):
                locations.setdefault(parts[:i], where)
    return data


def _is_set(data: dict, parts: tuple[str, ...]) -> bool:
    node: Any = data
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _remove(data: dict, locations: dict, parts: tuple[str, ...], item: str, where: Location, report: Reporter) -> None:
    node: Any = data
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or parts[-1] not in node:
        report.problems.append(_override_problem(
            item, "names a key the recipe does not set: nothing to remove", where,
            "list the recipe's keys with `loracli recipes show RECIPE`, or drop this item"))
        return
    del node[parts[-1]]
    for path in [p for p in locations if p[: len(parts)] == parts]:
        del locations[path]


def _mark(path: tuple, value: Any, where: Location, locations: dict) -> None:
    locations[path] = where
    if isinstance(value, dict):
        for key, sub in value.items():
            _mark((*path, key), sub, where, locations)


def _override_problem(item: str, message: str, where: Location, hint: str | None = None):
    from lora_cli.recipe.errors import RecipeProblem

    key = item.split("=", 1)[0].strip().lstrip("~") if isinstance(item, str) else ""
    return RecipeProblem(key, message, None, hint, where=where, has_value=False)
