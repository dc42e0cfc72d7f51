"""The recipes shipped in the repository's top-level ``recipes/`` folder."""

from __future__ import annotations

from pathlib import Path

import lora_cli
from lora_cli.errors import UserInputError, did_you_mean


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
