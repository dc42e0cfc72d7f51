"""What the wheel ships, read from the packaging files without building it (CI builds and
installs the wheel itself: .ci/wheel-check.sh)."""

from __future__ import annotations

import fnmatch
import subprocess
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="the standard library reads TOML from Python 3.11")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def _tracked(folder: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", folder],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.split()


def test_license_metadata_is_an_spdx_expression_with_its_file():
    """PEP 639: setuptools warns (and will refuse) a table-form license."""
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert all((ROOT / name).is_file() for name in PYPROJECT["project"]["license-files"])
    assert not any("License ::" in c for c in PYPROJECT["project"].get("classifiers", []))


def test_every_file_of_the_shipped_recipes_folder_goes_into_the_wheel():
    """A recipe, a data file or a template added to recipes/ is package data (or a module)."""
    folder = SETUPTOOLS["package-dir"]["lora_cli.shipped_recipes"]
    files = _tracked(folder)
    assert any(f.endswith(".yaml") for f in files) and any(f.startswith(f"{folder}/data/") for f in files)
    for path in files:
        parts = Path(path).relative_to(folder).parts
        package = ".".join(["lora_cli.shipped_recipes", *parts[:-1]])
        if parts[-1].endswith(".py"):
            continue  # a module of that package
        patterns = SETUPTOOLS["package-data"].get(package, [])
        assert any(fnmatch.fnmatch(parts[-1], p) for p in patterns), f"{path}: add its pattern to {package}'s package-data"
