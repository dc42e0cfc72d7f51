"""The recipes loracli ships, and ``shipped:`` references to them and to their data files.

The recipes live in the repository's top-level ``recipes/`` folder. A wheel carries that
folder as the package data ``lora_cli/shipped_recipes/`` (setup.py maps the package name
onto ``recipes/``), so :func:`recipes_dir` looks there first and falls back to the
checkout's ``recipes/`` (a source checkout on ``PYTHONPATH`` or an editable install, where
``lora_cli`` is the checkout's folder).

A recipe names a shipped file with ``shipped:<path inside that folder>``: ``extends:
shipped:food101_lora.yaml`` or ``train_file: shipped:data/sentiment.csv``. It resolves to
the same file from a checkout, an editable install or a wheel, whatever the current
directory, and stays valid in a copy that ``loracli recipes copy`` writes elsewhere.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import lora_cli
from lora_cli.errors import UserInputError, did_you_mean
from lora_cli.recipe.errors import RecipeError
from lora_cli.recipe.yamlfile import read_recipe_file

SHIPPED_PREFIX = "shipped:"
"""Prefix of a path inside the shipped recipes folder (``shipped:data/sentiment.csv``)."""

PACKAGE_FOLDER = "shipped_recipes"
"""Where a built wheel puts ``recipes/`` inside the ``lora_cli`` package (setup.py's mapping)."""


def recipes_dir() -> Path:
    """The shipped recipes folder: the installed package data, else the checkout's ``recipes/``."""
    package = Path(lora_cli.__file__).resolve().parent
    installed = package / PACKAGE_FOLDER
    return installed if installed.is_dir() else package.parent / "recipes"


def shipped_recipes() -> dict[str, Path]:
    """{name: path}, sorted by name."""
    folder = recipes_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def is_shipped_ref(value: object) -> bool:
    """``value`` is a ``shipped:`` reference."""
    return isinstance(value, str) and value.startswith(SHIPPED_PREFIX)


def shipped_path(ref: str) -> Path:
    """The file a ``shipped:<path>`` reference names (it need not exist yet: callers report that).

    Raises ValueError (message, fix) for a path that is absolute, empty or leaves the folder.
    """
    rest = ref[len(SHIPPED_PREFIX):].strip()
    parts = PurePosixPath(rest.replace("\\", "/")).parts
    if not parts or PurePosixPath(rest).is_absolute() or ".." in parts:
        raise ValueError(
            "must name a file inside the shipped recipes folder",
            f"write {SHIPPED_PREFIX}<path relative to that folder>, e.g. {SHIPPED_PREFIX}data/sentiment.csv "
            f"(`loracli recipes` lists the recipes; the folder is {recipes_dir()})",
        )
    return recipes_dir().joinpath(*parts)


def data_path(value: str) -> Path:
    """A recipe's data path as an absolute path: ``shipped:`` ones inside the shipped recipes
    folder, others relative to the current directory. ValueError as :func:`shipped_path`."""
    if is_shipped_ref(value):
        return shipped_path(value)
    return Path(value).expanduser().absolute()


def describe(path: Path) -> str:
    """A recipe's one-line description: its first comment line."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.startswith("#"):
            return text.lstrip("#").strip()
        if text:
            break
    return ""


def find_shipped(name: str) -> Path:
    """The shipped recipe called ``name`` (with or without .yaml)."""
    recipes = shipped_recipes()
    key = name[:-5] if name.endswith(".yaml") else name
    if key in recipes:
        return recipes[key]
    hint = did_you_mean(key, recipes) or f"shipped recipes: {', '.join(recipes) or 'none'}"
    raise UserInputError(f"no shipped recipe named {name!r} ({hint})")


def known_rate(name_or_path: str | None, method: str | None) -> str | None:
    """The learning rate a shipped recipe trains ``name_or_path`` with (the same adapter method
    preferred), as a phrase for the not-learning warning: ``"recipes/x.yaml uses 5e-4"``; None
    when no shipped recipe names this model (or one cannot be read: a hint is never worth an error)."""
    if not name_or_path:
        return None
    found: list[tuple[bool, str, float]] = []
    for name, path in shipped_recipes().items():
        try:
            data, _ = read_recipe_file(path, path.name)
        except RecipeError:
            continue
        model, adapter, training = (data.get(k) or {} for k in ("model", "adapter", "training"))
        rate = training.get("learning_rate") if isinstance(training, dict) else None
        if not isinstance(model, dict) or model.get("name_or_path") != name_or_path or rate is None:
            continue
        same = isinstance(adapter, dict) and adapter.get("method", "lora") == (method or "lora")
        try:
            found.append((same, name, float(rate)))
        except (TypeError, ValueError):
            continue
    if not found:
        return None
    same, name, rate = max(found, key=lambda item: item[0])  # first of the same method, else the first
    return f"the shipped recipe recipes/{name}.yaml uses {rate:g} for this model"
