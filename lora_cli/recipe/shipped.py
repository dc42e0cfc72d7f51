"""The recipes shipped in the repository's top-level ``recipes/`` folder."""

from __future__ import annotations

from pathlib import Path

import lora_cli
from lora_cli.errors import UserInputError, did_you_mean
from lora_cli.recipe.errors import RecipeError
from lora_cli.recipe.yamlfile import read_recipe_file


def recipes_dir() -> Path:
    return Path(lora_cli.__file__).resolve().parent.parent / "recipes"


def shipped_recipes() -> dict[str, Path]:
    """{name: path}, sorted by name."""
    folder = recipes_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


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
