"""The ``adapter`` section: a method name plus that method's config fields.

Values are checked by constructing the method's config dataclass, so the recipe and the
engine never disagree about what is valid. AdaLoRA's ``total_step`` may be left out: the
trainer derives it from the data size, epochs and batch size and passes it to
:meth:`Recipe.adapter_config`, which checks the ``tinit`` / ``tfinal`` schedule against it
then. At validation time a placeholder that leaves a budgeting phase stands in.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

from lora_cli.errors import AdapterConfigError, LoraCliError, UserInputError
from lora_cli.recipe.errors import (
    NO_VALUE,
    Location,
    RecipeError,
    Reporter,
    did_you_mean,
    is_bool_word,
)
from lora_cli.recipe.schema import ADAPTER_BOOKKEEPING

PLANNED_METHODS = ("lora", "loha", "lokr", "adalora")


def available() -> list[str]:
    from lora_cli.adapters import available_methods

    return available_methods()


def resolve_method(name: Any):
    """The registered AdapterMethod for a recipe's ``adapter.method``, or an error message + hint."""
    from lora_cli.adapters import get_method

    if not isinstance(name, str):
        return None, "must be a method name", f"choose one of {', '.join(available())}"
    try:
        return get_method(name), None, None
    except UserInputError:
        pass
    choices = available()
    if name.lower() in PLANNED_METHODS:
        return None, "is not available in this version of loracli yet", f"available: {', '.join(choices)}"
    hint = did_you_mean(name.lower(), choices) or f"choose one of {', '.join(choices)}"
    return None, "is not a known adapter method", hint


def allowed_fields(method) -> list[str]:
    return [f for f in method.config_cls.field_names() if f not in ADAPTER_BOOKKEEPING]


@functools.cache
def _annotations(config_cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(config_cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation only skips this check
        return {}


def _bool_problem(config_cls: type, key: str, value: Any) -> bool:
    """A bool field given a non-bool, or a ``bool | str`` field given ``yes`` / ``off``.

    The engine treats any non-empty string as true, so ``use_dora: no`` (a string in YAML
    1.2) would switch DoRA on.
    """
    from lora_cli.recipe.training import takes_bool

    annotation = _annotations(config_cls).get(key)
    if annotation is None or not takes_bool(annotation):
        return False
    if is_bool_word(value):
        return True
    allowed = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    only_bool = all(a is bool for a in allowed)
    return only_bool and not isinstance(value, bool) and not (value is None and type(None) in typing.get_args(annotation))


def _placeholder_total_step(options: dict) -> int:
    tinit, tfinal = options.get("tinit", 0), options.get("tfinal", 0)
    if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (tinit, tfinal)):
        return tinit + tfinal + 1
    return 1_000_000


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else value
        return [_plain(v) for v in items]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def check_adapter(raw: Any, report: Reporter) -> tuple[str, dict[str, Any]] | None:
    """Validate the adapter section; returns (method name, normalised options) or None."""
    path = ("adapter",)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        report.add(path, "must be a mapping with method and the method's settings", raw, "e.g. `method: lora` and `r: 16`")
        return None
    raw = dict(raw)
    method_name = raw.pop("method", "lora")
    method, message, hint = resolve_method(method_name)
    if method is None:
        report.add((*path, "method"), message, method_name, hint)
        return None
    allowed = allowed_fields(method)
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ADAPTER_BOOKKEEPING:
            report.add((*path, key), "is set automatically by loracli", value, "remove it")
        elif key not in allowed:
            hint = did_you_mean(key, allowed) or f"{method.name} settings are: {', '.join(allowed)}"
            report.add((*path, key), f"is not a {method.name} setting", value, hint)
        elif _bool_problem(method.config_cls, key, value):
            report.settle((*path, key), "must be true or false", value)
        else:
            options[key] = value
    before = len(report.problems)
    config = _construct(method, options, None, report)
    if config is None or len(report.problems) > before:
        return None
    fields = {f.name for f in dataclasses.fields(config)}
    normalised = {name: _plain(getattr(config, name)) for name in allowed if name in fields}
    if "total_step" in fields and options.get("total_step") is None:
        normalised.pop("total_step", None)
    return method.name, normalised


def _construct(method, options: dict, total_step: int | None, report: Reporter):
    kwargs = dict(options)
    derived = False
    if "total_step" in method.config_cls.field_names() and kwargs.get("total_step") is None:
        derived = total_step is not None
        kwargs["total_step"] = total_step if derived else _placeholder_total_step(kwargs)
    try:
        return method.config_cls(**kwargs)
    except AdapterConfigError as exc:
        for problem in exc.problems:
            field = str(problem.key).split("[")[0].split(".")[0]
            hint = problem.hint
            if derived and field in ("total_step", "tinit", "tfinal"):
                note = f"total_step {total_step} was derived from the data size, epochs and batch size"
                hint = f"{hint}; {note}" if hint else note
            value = problem.value
            path = ("adapter", field) if field in options else ("adapter",)
            report.add(path, f"{problem.key} {problem.message}" if path == ("adapter",) else problem.message, value, hint)
    except (TypeError, ValueError, UserInputError) as exc:
        report.add(("adapter",), f"invalid {method.name} settings: {exc}", NO_VALUE)
    return None


def build_adapter_config(recipe, total_step: int | None = None):
    """The adapter config dataclass for a validated recipe (see Recipe.adapter_config)."""
    from lora_cli.adapters import get_method

    method = get_method(recipe.adapter.method)
    source = str(recipe.source) if recipe.source else recipe.name
    locations = getattr(recipe, "_locations", None) or {(): Location(source, None)}
    report = Reporter(locations, source)
    needs_step = "total_step" in method.config_cls.field_names()
    if needs_step and recipe.adapter.options.get("total_step") is None and total_step is None:
        raise LoraCliError(
            f"{method.name} needs total_step: pass recipe.adapter_config(total_step=...) with the number "
            "of optimizer steps, or set adapter.total_step in the recipe"
        )
    config = _construct(method, recipe.adapter.options, total_step, report)
    if config is None:
        raise RecipeError(report.problems, source=source)
    return config
