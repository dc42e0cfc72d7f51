"""``load_recipe``: file -> extends -> overrides -> validation -> :class:`Recipe`.

Every problem found on the way is collected and raised as ONE :class:`RecipeError`, each
naming its file and line (or the override), the key, the value and the fix.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lora_cli.errors import did_you_mean
from lora_cli.recipe import checks
from lora_cli.recipe.adapter import check_adapter
from lora_cli.recipe.data import (
    DATA_PATHS,
    DATA_SECTIONS,
    DataSection,
    data_section_for,
    is_template_text,
    without_flat_defaults,
)
from lora_cli.recipe.errors import Location, RecipeError, RecipeProblem, Reporter
from lora_cli.recipe.overrides import apply_overrides
from lora_cli.recipe.schema import ModelSection, Recipe
from lora_cli.recipe.shipped import (
    SHIPPED_PREFIX,
    data_path,
    is_shipped_ref,
    shipped_path,
    shipped_recipes,
)
from lora_cli.recipe.training import check_training
from lora_cli.recipe.yamlfile import read_recipe_file
from lora_cli.task_kinds import TASK_KINDS, TASKS

MAX_EXTENDS = 16
"""Longest chain of ``extends:`` files (each file is also held to yamlio's limits)."""

DEFAULT_METHOD = "lora"
"""``adapter.method`` when a recipe leaves it out (as :func:`check_adapter` reads it)."""


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """Read, resolve and validate a recipe file; raise one RecipeError listing every problem.

    ``path`` may be ``shipped:<name>.yaml``, a shipped recipe (as in ``extends:``), unless a file
    of that name exists."""
    shown = os.fspath(path)
    path = _shipped_recipe(shown) if is_shipped_ref(shown) and not Path(shown).exists() else Path(path)
    try:
        data, locations = _resolve(path, shown, stack=())
    except RecipeError as exc:
        if exc.source == shown:
            raise
        raise RecipeError(exc.problems, source=shown) from None
    report = Reporter(locations, shown)
    data = apply_overrides(data, locations, list(overrides or ()), report)
    recipe = _validate(data, report)
    recipe._source = path.resolve()
    recipe._locations = locations
    recipe.adapter._source, recipe.adapter._locations = shown, locations
    recipe.data._source, recipe.data._locations = shown, locations
    return recipe


# ------------------------------------------------------------------------- extends
def _resolve(path: Path, shown: str, stack: tuple, where: Location | None = None) -> tuple[dict, dict]:
    data, locations = read_recipe_file(path, shown, where)
    key = path.resolve()
    if "extends" not in data:
        return data, locations
    parent_ref = data.pop("extends")
    ext_loc = locations.pop(("extends",))
    if parent_ref is None:
        return data, locations
    if not isinstance(parent_ref, str) or not parent_ref.strip():
        raise RecipeError(
            [RecipeProblem("extends", "must be the path of another recipe", parent_ref,
                           "a path relative to this recipe's folder", where=ext_loc)],
            source=shown,
        )
    if is_shipped_ref(parent_ref):
        parent, parent_shown = _shipped_parent(parent_ref, ext_loc, shown), parent_ref
    else:
        parent = path.parent / parent_ref
        parent_shown = os.path.normpath(str(Path(shown).parent / parent_ref))
    chain = (*stack, key)
    if len(chain) >= MAX_EXTENDS:
        raise RecipeError(
            [RecipeProblem("extends", f"makes a chain of more than {MAX_EXTENDS} recipes, the limit", parent_ref,
                           "extend a recipe that extends nothing, or fold some levels together", where=ext_loc)],
            source=shown,
        )
    if parent.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, parent.resolve()))
        raise RecipeError(
            [RecipeProblem("extends", "makes a cycle of recipes", parent_ref, f"cycle: {cycle}", where=ext_loc)],
            source=shown,
        )
    base, base_locations = _resolve(parent, parent_shown, chain, where=ext_loc)
    base, base_locations = _without_other_method(base, base_locations, data)
    return _merge(base, base_locations, data, locations)


def _shipped_recipe_file(ref: str) -> Path:
    """The shipped recipe ``shipped:<name>.yaml`` names; ValueError (message, fix) when none does."""
    found = shipped_path(ref)  # ValueError for a path leaving the folder
    if not found.is_file():
        names = [f"{n}.yaml" for n in shipped_recipes()]
        hint = did_you_mean(found.name, names) or f"shipped recipes: {', '.join(names) or 'none'}"
        raise ValueError("names no shipped recipe", hint.replace("did you mean ", f"did you mean {SHIPPED_PREFIX}", 1))
    return found


def _shipped_recipe(ref: str) -> Path:
    """The shipped recipe a command line's ``shipped:<name>.yaml`` names."""
    try:
        return _shipped_recipe_file(ref)
    except ValueError as exc:
        message, hint = exc.args
    raise RecipeError([RecipeProblem("", message, None, hint, where=Location(ref, None), has_value=False)],
                      source=ref)


def _shipped_parent(ref: str, where: Location, shown: str) -> Path:
    """The shipped recipe ``extends: shipped:<name>.yaml`` names."""
    try:
        return _shipped_recipe_file(ref)
    except ValueError as exc:
        message, hint = exc.args
    raise RecipeError([RecipeProblem("extends", message, ref, hint, where=where)], source=shown)


def _without_other_method(base: dict, base_loc: dict, child: dict) -> tuple[dict, dict]:
    """The parent's adapter section left out when the child names another method.

    Adapter settings belong to their method (LoRA's ``lora_alpha`` is not a LoHa setting),
    so a child that switches method writes its whole adapter section; the parent's model,
    data and training still apply.
    """
    mine, theirs = child.get("adapter"), base.get("adapter")
    if not (isinstance(mine, dict) and "method" in mine and isinstance(theirs, dict)):
        return base, base_loc
    if mine["method"] == theirs.get("method", DEFAULT_METHOD):
        return base, base_loc
    return ({k: v for k, v in base.items() if k != "adapter"},
            {p: loc for p, loc in base_loc.items() if p[:1] != ("adapter",)})


def _merge(base: dict, base_loc: dict, child: dict, child_loc: dict) -> tuple[dict, dict]:
    """Deep merge: mappings merge key by key, anything else from the child wins."""
    locations = dict(base_loc)

    def merge(b: dict, c: dict, prefix: tuple) -> dict:
        out = copy.deepcopy(b)
        for key, value in c.items():
            path = (*prefix, key)
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value, path)
            else:
                for stale in [p for p in locations if p[: len(path)] == path]:
                    del locations[stale]
                out[key] = copy.deepcopy(value)
        return out

    data = merge(base, child, ())
    locations.update(child_loc)
    return data, locations


# ---------------------------------------------------------------------- validation
def _validate(data: dict, report: Reporter) -> Recipe:
    _check_finite(data, (), report)
    adapter = check_adapter(data.get("adapter"), report)
    training = check_training(data.get("training"), report)
    plain = {k: v for k, v in data.items() if k not in ("adapter", "training")}
    _absolute_paths(plain, report)
    section = _validate_data(plain.get("data"), data.get("task"), report)
    try:
        Recipe.model_validate({**plain, "data": section or DataSection.model_construct()} if "data" in plain else plain)
    except ValidationError as exc:
        for error in exc.errors():
            _pydantic_problem(error, report)
    checks.check_model(data.get("model"), data.get("task"), report)
    checks.check_data(data.get("data"), data.get("task"), report)
    checks.check_sharding(data.get("training"), report)
    checks.check_metric_for_best_model(data.get("training"), data.get("task"), report)
    checks.check_adapter_with_training(adapter, data.get("training"), report)
    checks.check_adapter_with_model(data.get("adapter"), data.get("model"), data.get("task"), report)
    report.raise_if_any()
    assert adapter is not None and training is not None and section is not None
    plain["adapter"] = {"method": adapter[0], "options": adapter[1]}
    plain["training"] = training
    plain["data"] = section
    return Recipe.model_validate(plain)


def _validate_data(raw: Any, task: Any, report: Reporter) -> DataSection | None:
    """The task's own data section, problems reported at their lines (None when any)."""
    if not isinstance(raw, dict):
        return None  # missing or not a mapping: the Recipe model reports it
    if task not in TASK_KINDS:
        return None  # the task's problem is reported; its data keys cannot be judged
    cls = data_section_for(task)
    try:
        return cls.model_validate(without_flat_defaults(raw, cls))
    except ValidationError as exc:
        for error in exc.errors():
            _pydantic_problem({**error, "loc": ("data", *error["loc"])}, report, task=task)
    return None


def _check_finite(value: Any, path: tuple, report: Reporter) -> None:
    """Every number in the recipe, in any section or override: NaN and infinity are refused.

    YAML reads ``.nan`` / ``.inf`` (and ``1e999``) as floats, which pass type checks and
    every ``<`` / ``>`` bound. The key is settled, so section checks add nothing on it.
    """
    if isinstance(value, float) and not math.isfinite(value):
        report.settle(path, "must be a finite number", value, "NaN and infinity are not usable settings")
    elif isinstance(value, dict):
        for key, sub in value.items():
            _check_finite(sub, (*path, key), report)
    elif isinstance(value, list):
        for sub in value:
            _check_finite(sub, path, report)


def _absolute_paths(plain: dict, report: Reporter) -> None:
    """Data paths and a chat template file made absolute: relative to the current directory,
    ``shipped:`` ones to the shipped recipes folder (:mod:`lora_cli.recipe.shipped`)."""
    section = plain.get("data")
    if isinstance(section, dict):
        section = plain["data"] = dict(section)
        for key in DATA_PATHS:
            value = section.get(key)
            if isinstance(value, str) and value:
                try:
                    section[key] = str(data_path(value))
                except ValueError as exc:
                    report.settle(("data", key), exc.args[0], value, exc.args[1])
        template = section.get("chat_template")
        if isinstance(template, str) and template.strip() and not is_template_text(template):
            try:
                section["chat_template"] = str(data_path(template))
            except ValueError as exc:
                report.settle(("data", "chat_template"), exc.args[0], template, exc.args[1])


_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "is not a recipe key",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "string_too_short": "must not be empty",
}


def _pydantic_problem(error: dict, report: Reporter, task: str | None = None) -> None:
    loc = tuple(p for p in error["loc"] if not isinstance(p, int))
    kind = error["type"]
    value = error.get("input")
    message = _MESSAGES.get(kind)
    hint = None
    if kind == "extra_forbidden":
        known = _fields_at(loc[:-1], task)
        hint = did_you_mean(loc[-1], known) or f"valid keys: {', '.join(known)}"
        if loc == ("extends",):
            hint = None
        elif loc[:-1] == ("data",) and task is not None:
            owners = [t for t, c in DATA_SECTIONS.items() if loc[-1] in c.model_fields]
            if owners:  # a key of another task's data
                message = f"is not a {task} data setting"
                hint = f"it is for task {' / '.join(owners)}; remove it"
    elif kind == "missing":
        report.add(loc, "is required", hint=_missing_hint(loc))
        return
    elif kind == "literal_error":
        choices = ("digits",)
        message = "must be one of " + ", ".join(repr(c) for c in choices)
        hint = did_you_mean(value, choices) if isinstance(value, str) else None
    elif kind == "value_error":  # a schema rule (run name, task, data columns): RuleError carries message and fix
        rule = (error.get("ctx") or {}).get("error")
        message = getattr(rule, "message", None) or str(rule or error["msg"])
        hint = getattr(rule, "hint", None)
        field = getattr(rule, "field", None)
        if field is not None:
            loc = (*loc, field)
            value = (value or {}).get(field) if isinstance(value, dict) else value
    elif kind in ("greater_than", "less_than", "greater_than_equal", "less_than_equal"):
        message = error["msg"].replace("Input should be", "must be")
        if loc == ("data", "val_split"):
            hint = "a fraction in (0, 1), e.g. 0.1"
    if message is None:
        message = error["msg"].replace("Input should be", "must be")
    report.add(loc, message, value, hint)


def _missing_hint(loc: tuple) -> str | None:
    return {
        ("name",): "add `name: my-run` (the run goes to runs/<name>)",
        ("task",): f"add `task:` with one of {', '.join(TASKS)}",
        ("model",): "add a model section with name_or_path (hub id / folder) or config",
        ("data",): "add a data section with one source: dataset, imagefolder, train_file or builtin",
    }.get(loc)


def _fields_at(loc: tuple, task: str | None = None) -> list[str]:
    if loc == ():
        return [*Recipe.model_fields]
    if loc == ("model",):
        return [*ModelSection.model_fields]
    if loc == ("data",):
        return [*data_section_for(task).model_fields]
    return []
