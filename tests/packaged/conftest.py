"""Fixtures of the packaged-model tests: a private cache per test, and a fake packaged model
whose "conversion" saves a tiny ViT, so the registry and cache run in milliseconds."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest

from lora_cli.packaged import cache, registry
from lora_cli.packaged.base import Packaged, VerificationError

FAKE = "fake-model"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """An empty loracli cache for this test ($LORACLI_CACHE)."""
    folder = tmp_path / "loracli-cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(folder))
    return folder


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory) -> Path:
    """One cache for the real conversions of a session: each package is converted once."""
    return tmp_path_factory.mktemp("loracli-real-cache")


@pytest.fixture
def use_real_cache(real_cache, monkeypatch) -> Path:
    monkeypatch.setenv(cache.CACHE_ENV, str(real_cache))
    return real_cache


class FakeConverter:
    """Saves a tiny ViT classifier and its processor; counts calls; can fail verification or wait."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False
        self.hold = 0.0
        self.lock = threading.Lock()

    def __call__(self, source: Path, out: Path) -> dict:
        from transformers import ViTImageProcessor

        from tests.helpers import tiny_vit

        with self.lock:
            self.calls += 1
        time.sleep(self.hold)  # lets a second resolver arrive while this one converts
        tiny_vit(num_labels=3).save_pretrained(out)
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
        if self.fail:
            raise VerificationError(f"{FAKE}: the converted model differs from the packaged one by 1 (max abs)")
        return {"max_abs_diff": 0.0, "source": json.loads(source.read_text())["weights"]}


@pytest.fixture
def fake(tmp_path, monkeypatch, cache_dir) -> FakeConverter:
    """``pypi:fake-model`` (version 1.0) in the registry, installed, its source a small file."""
    source = tmp_path / "fake-source.json"
    source.write_text(json.dumps({"weights": "tiny"}), encoding="utf-8")
    converter = FakeConverter()
    entry = Packaged(FAKE, "1.0", "MIT", "tiny ViT, JSON", source="fake_model/fake-source.json", convert=converter)
    monkeypatch.setitem(registry.REGISTRY, FAKE, entry)
    monkeypatch.setattr(registry, "installed_version", lambda dist: "1.0" if dist == FAKE else None)
    monkeypatch.setattr(registry, "source_file", lambda entry, key: source)
    return converter


def with_convert(monkeypatch, dist: str, convert) -> Packaged:
    """Replace the converter of a real registry entry for one test."""
    entry = dataclasses.replace(registry.REGISTRY[dist], convert=convert)
    monkeypatch.setitem(registry.REGISTRY, dist, entry)
    return entry
