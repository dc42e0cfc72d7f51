"""Runs of every served kind, built once per session, and the backend holding them."""

from __future__ import annotations

import pytest

from tests.serve.runs import all_runs


@pytest.fixture(scope="session")
def serve_runs(tmp_path_factory):
    """name -> run directory: image runs (LoRA pairs on one base, LoHa, another base), text classifiers, LMs."""
    runs = all_runs(tmp_path_factory.mktemp("serve-runs"))
    plots = runs["img-a"] / "plots"
    plots.mkdir()
    (plots / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)  # only served, never decoded
    return runs


@pytest.fixture(scope="session")
def backend(serve_runs):
    from lora_cli.serve.backend import Backend

    return Backend.load(list(serve_runs.items()))
