"""The ``adapter`` section: a method name plus that method's config fields.

Validation checks the values by constructing the method's config dataclass, so the recipe
and the engine never disagree about what is valid, and invents nothing: a field the
pipeline derives (AdaLoRA's ``total_step``, from the data size, epochs and batch size) may
be left out, and its checks run when :func:`resolve_adapter_config` receives it. That
function is the one place a recipe's adapter section becomes the engine's config.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from collections.abc import Sequence
from typing import Any

from lora_cli.adapters import available_methods, get_method
from lora_cli.errors import AdapterConfigError, UserInputError, did_you_mean
from lora_cli.recipe.errors import NO_VALUE, Location, RecipeError, Reporter, is_bool_word
from lora_cli.recipe.schema import ADAPTER_BOOKKEEPING, AdapterSection
from lora_cli.recipe.training import takes_bool

RECIPE_ONLY = {"calibration_batches": "the number of training batches the calibration pass of a data-driven init "
                                      "(init_lora_weights eva, corda, lora_ga) reads"}
"""Adapter-section keys of loracli's own, never passed to the engine's config."""

DERIVED = ("total_step",)
"""Config fields the pipeline derives when the recipe leaves them out (AdaLoRA's schedule
length: the optimizer steps of the run)."""


def resolve_method(name: Any):
    """The registered AdapterMethod for a recipe's ``adapter.method``, or an error message + hint."""
    if not isinstance(name, str):
        return None, "must be a method name", f"choose one of {', '.join(available_methods())}"
    try:
        return get_method(name), None, None
    except UserInputError:
        pass
    choices = available_methods()
    hint = did_you_mean(name.lower(), choices) or f"choose one of {', '.join(choices)}"
    return None, "is not a known adapter method", hint


def allowed_fields(method) -> list[str]:
    unused = set(ADAPTER_BOOKKEEPING) | set(method.config_cls.LAYER_FIELDS)  # inherited fields the method does not use
    return [f for f in method.config_cls.field_names() if f not in unused]


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
    annotation = _annotations(config_cls).get(key)
    if annotation is None or not takes_bool(annotation):
        return False
    if is_bool_word(value):
        return True
    allowed = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    only_bool = all(a is bool for a in allowed)
    return only_bool and not isinstance(value, bool) and not (value is None and type(None) in typing.get_args(annotation))


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
    own = {key: raw.pop(key) for key in RECIPE_ONLY if key in raw}
    for key, value in own.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            report.add((*path, key), "must be an integer >= 1", value,
                       f"{key} is {RECIPE_ONLY[key]}; e.g. 16 (more: a steadier start, a longer calibration)")
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
    deferred = _deferred(method, options)
    config = _construct(method, options, report, deferred=deferred)
    if len(report.problems) > before:
        return None
    if config is None:  # valid, but for the fields the pipeline derives: normalise from the defaults
        normalised = {name: _plain(value) for name, value in _defaults(method.config_cls).items() if name in allowed}
        normalised.update({name: _plain(value) for name, value in options.items()})
    else:
        fields = {f.name for f in dataclasses.fields(config)}
        normalised = {name: _plain(getattr(config, name)) for name in allowed if name in fields}
    for name in deferred:
        normalised.pop(name, None)
    normalised.update(own)
    return method.name, normalised


def _deferred(method, options: dict) -> tuple[str, ...]:
    """The derived fields (``DERIVED``) this method has and the recipe leaves to the pipeline."""
    names = method.config_cls.field_names()
    return tuple(name for name in DERIVED if name in names and options.get(name) is None)


def _defaults(config_cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _construct(method, options: dict, report: Reporter, *, deferred: tuple[str, ...] = (),
               derived: dict[str, Any] | None = None):
    """The config, or None with the problems reported at the recipe's adapter lines.

    ``deferred`` fields are absent on purpose (the pipeline derives them): the engine's
    "is required" for them is not a problem yet. ``derived`` are values the pipeline
    worked out; problems they cause say so.
    """
    derived = derived or {}
    try:
        return method.config_cls(**options, **derived)
    except AdapterConfigError as exc:
        for problem in exc.problems:
            field = str(problem.key).split("[")[0].split(".")[0]
            if field in deferred and problem.value is None:
                continue
            hint = problem.hint
            for name, value in derived.items():
                if name in str(problem.key) or name in problem.message:
                    note = f"{name} {value} was derived from the data size, epochs and batch size"
                    hint = f"{hint}; {note}" if hint else note
            path = ("adapter", field) if field in options else ("adapter",)
            entry = re.fullmatch(rf"{re.escape(field)}\['([^']*)'\]", str(problem.key))  # one key of a mapping field
            if entry and isinstance(options.get(field), dict) and entry.group(1) in options[field]:
                path = (*path, entry.group(1))  # X-LoRA's adapters.<expert>: that line
            message = f"{problem.key} {problem.message}" if path == ("adapter",) else problem.message
            report.add(path, message, problem.value, hint)
    except (TypeError, ValueError, UserInputError) as exc:
        report.add(("adapter",), f"invalid {method.name} settings: {exc}", NO_VALUE)
    return None


def resolve_adapter_config(
    section: AdapterSection,
    *,
    total_step: int | None,
    targets: Sequence[str] | None = None,
    heads: Sequence[str] = (),
    task_type: str | None = None,
    base_model: str | None = None,
):
    """The engine's config for a validated adapter section: the one place it is built.

    Filled in where the recipe leaves them out: ``total_step`` (the run's optimizer steps,
    for methods with a schedule), ``targets`` (the model's default target modules, None
    when loracli has none), ``task_type`` (the task's PEFT type) and ``base_model``. The
    trained ``heads`` join ``modules_to_save``. A derived value that breaks the method's
    rules is a RecipeError at the recipe's adapter lines.
    """
    method = get_method(section.method)
    options = {k: v for k, v in section.options.items() if k not in RECIPE_ONLY}
    derived: dict[str, Any] = {}
    for name in _deferred(method, options):
        if total_step is None:
            raise UserInputError(
                f"adapter: {method.name} needs {name}; set adapter.{name} in the recipe, or let `loracli train` "
                "derive it from the data size, epochs and batch size"
            )
        derived[name] = total_step
    if options.get("target_modules") is None and options.get("target_parameters"):
        options["target_modules"] = []  # the parameters alone: no default targets added behind the user's back
    elif options.get("target_modules") is None and "target_modules" in allowed_fields(method):
        if targets is None:
            raise UserInputError(
                "adapter.target_modules is not set and loracli has no default for this model type; list the layers "
                "to adapt (e.g. target_modules: [q_proj, v_proj]) or use target_modules: all-linear"
            )
        options["target_modules"] = list(targets)
    saved = list(options.get("modules_to_save") or [])
    missing = [h for h in heads if h not in saved]
    if missing:
        options["modules_to_save"] = saved + missing
    if task_type:
        options["task_type"] = task_type
    if base_model:
        options["base_model_name_or_path"] = base_model
    source = section.source or "recipe"
    report = Reporter(section.locations or {(): Location(source, None)}, source)
    config = _construct(method, options, report, derived=derived)
    if config is None:
        raise RecipeError(report.problems, source=source)
    return config


def written_options(section: AdapterSection) -> dict[str, Any]:
    """The adapter options the recipe (or an override) sets, the method's defaults left out."""
    written = {path[1] for path in section.locations if len(path) >= 2 and path[0] == "adapter"}
    return {k: v for k, v in section.options.items() if k in written and k != "method"}


def carry_options(options: dict[str, Any], method: str, given: set[str]) -> tuple[dict[str, Any], list[str]]:
    """(options for ``method``, notes): another method's ``options`` carried over to ``method``
    (``sweep`` and ``tune`` changing ``adapter.method``), as the method's config class says
    (``carried_names``, ``derived_settings``): kept where ``method`` has them, renamed where it
    names them otherwise (``lora_alpha`` / ``alpha``), worked out from others (AdaLoRA's ranks
    from ``r``), the rest dropped. ``given`` are the ``adapter.<key>`` the caller sets itself,
    never rewritten."""
    new, _, _ = resolve_method(method)
    if new is None:
        return dict(options), []  # the point's recipe error names the method
    config_cls = new.config_cls
    allowed = set(allowed_fields(new))
    kept, notes = {}, []
    for key, value in options.items():
        twin = config_cls.carried_names.get(key, key)
        if twin is None:
            continue  # a setting this method has but does not take (AdaLoRA's r: see derived_settings)
        if key in allowed or key in RECIPE_ONLY:
            kept[key] = value
        elif twin in allowed and twin not in options and f"adapter.{twin}" not in given:
            kept[twin] = value
            notes.append(f"{key} {value} -> {twin} {value}")
        else:
            notes.append(f"dropped {key} {value} ({method} has no such option)")
    for key, (source, value) in config_cls.derived_settings(options).items():
        if f"adapter.{key}" not in given:
            kept[key] = value
            notes.append(f"{source} {options[source]} -> {key} {value}")
    return kept, notes
