"""Runs of every served kind, built once per session, and the backend holding them."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.serve.runs import all_runs


@pytest.fixture(scope="session")
def serve_runs(tmp_path_factory):
    """name -> run directory: image runs (LoRA pairs on one base, LoHa, another base), text classifiers, LMs."""
    runs = all_runs(tmp_path_factory.mktemp("serve-runs"))
    plots = runs["img-a"] / "plots"
    plots.mkdir()
    Image.new("RGB", (120, 60), (43, 125, 233)).save(plots / "loss.png")  # what the card shows
    return runs


@pytest.fixture(scope="session")
def backend(serve_runs):
    from lora_cli.serve.backend import Backend

    return Backend.load(list(serve_runs.items()))
