from __future__ import annotations

import json

from PIL import Image

from lora_cli.inference.plots import plot_training_curves


def test_training_curves_from_trainer_log(tmp_path):
    events = [{"loss": 2.0 - 0.1 * s, "learning_rate": 1e-3, "epoch": s / 10, "step": s} for s in range(1, 11)]
    events += [{"eval_loss": 1.5, "eval_accuracy": 0.4, "epoch": 0.5, "step": 5},
               {"eval_loss": 1.1, "eval_accuracy": 0.7, "epoch": 1.0, "step": 10}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in events) + "\nnot json\n")
    written = plot_training_curves(path, tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png", "accuracy.png"]
    for p in written:
        with Image.open(p) as img:
            assert img.size[0] > 300 and p.stat().st_size > 5_000


def test_no_accuracy_logged_writes_loss_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"loss": 1.0, "step": 1}) + "\n" + json.dumps({"loss": 0.5, "step": 2}) + "\n")
    written = plot_training_curves(path, tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png"]
    assert not (tmp_path / "plots" / "accuracy.png").exists()
