"""Fixtures for recipe tests: write a recipe in a temporary working directory."""

from __future__ import annotations

import textwrap

import pytest


@pytest.fixture
def write(tmp_path, monkeypatch):
    """write(text, name="recipe.yaml") -> path; the cwd is tmp_path so messages show short names."""
    monkeypatch.chdir(tmp_path)

    def _write(text: str, name: str = "recipe.yaml"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path.relative_to(tmp_path)

    return _write
