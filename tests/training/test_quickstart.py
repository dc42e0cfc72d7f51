"""The shipped quickstart trains for real: sklearn's digits to >= 90 % eval accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_cli.recipe import load_recipe
from tests.training._util import loracli

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


@pytest.mark.slow
def test_quickstart_reaches_90_percent(tmp_path, monkeypatch, capsys):
    run = tmp_path / "quickstart"
    assert loracli(monkeypatch, "train", QUICKSTART, f"output_dir={run}") == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["accuracy"] >= 0.90, report["accuracy"]
    assert report["num_classes"] == 10 and report["num_samples"] == 360  # 20 % of 1,797 digits
    matrix = report["confusion_matrix"]
    assert sum(map(sum, matrix)) == report["num_samples"]
    assert sum(matrix[i][i] for i in range(10)) / report["num_samples"] == pytest.approx(report["accuracy"])
    assert report["trainer"]["eval_accuracy"] == pytest.approx(report["accuracy"], abs=1e-6)
    for plot in ("loss.png", "accuracy.png", "confusion_matrix.png"):
        assert (run / "plots" / plot).is_file()
    assert load_recipe(run / "recipe.yaml") == load_recipe(QUICKSTART, [f"output_dir={run}"])
    assert "eval_accuracy" in capsys.readouterr().err
