"""``training.torch_compile`` through the Trainer: a compiled LoRA run trains, saves an
adapter with the uncompiled model's key names, and follows the eager run's losses.

Eager and compiled runs share the seed, the data (no augmentation) and no dropout, so
their per-step losses agree to float rounding: a compiled step that trained something
else (a wrapper that dropped the adapter, a graph that froze it) would not.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from tests.training._util import loracli, write_recipe


def _losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r and "eval_loss" not in r]


def _train(tmp_path, imagefolder, monkeypatch, name: str, **training) -> object:
    recipe = write_recipe(tmp_path / f"{name}.yaml", imagefolder, tmp_path / name, training=training)
    assert loracli(monkeypatch, "train", recipe) == 0
    return tmp_path / name


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_lora_run_matches_the_eager_run(tmp_path, imagefolder, monkeypatch, backend):
    torch._dynamo.reset()
    counters.clear()
    eager = _train(tmp_path, imagefolder, monkeypatch, "eager")
    assert not counters["stats"]["unique_graphs"]  # the eager run compiled nothing
    compiled = _train(tmp_path, imagefolder, monkeypatch, "compiled", torch_compile=True,
                      torch_compile_backend=backend)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    torch._dynamo.reset()
    assert graphs >= 1 and breaks == 0, (graphs, dict(counters["graph_break"]))
    eager_losses, compiled_losses = _losses(eager), _losses(compiled)
    assert len(eager_losses) == len(compiled_losses) == 4
    assert eager_losses[0] != eager_losses[-1]  # it trained
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)

    saved = load_file(str(compiled / "adapter" / "adapter_model.safetensors"))
    reference = load_file(str(eager / "adapter" / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(reference) and not any("_orig_mod" in k for k in saved)
    for key, value in reference.items():
        assert (saved[key] - value).abs().max() < 1e-4, key
