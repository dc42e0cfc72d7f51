from __future__ import annotations

import json

import pytest
from PIL import Image

from lora_cli.evaluation.plots import plot_training_curves


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


def test_confusion_matrix_with_hostile_class_names(tmp_path):
    import numpy as np

    from lora_cli.evaluation.plots import plot_confusion_matrix

    names = ['=HYPERLINK("http://x")', "+1", "-2", "@SUM(A1)", "\x1b[31mred\x1b[0m", "a\x07b", "\u202eevil",
             "$\\x$", "$$", "x$^{2}$"]
    cm = np.eye(len(names), dtype=int) * 4 + 1
    png = plot_confusion_matrix(cm, names, tmp_path / "cm.png", title="run $\\x$")
    with Image.open(png) as img:
        assert img.size[0] > 300 and png.stat().st_size > 5_000


def test_plot_labels_are_drawn_literally(monkeypatch, tmp_path):
    import numpy as np

    from lora_cli.evaluation import plots

    seen = {}

    def keep(fig, path):
        ax = fig.axes[0]
        seen["x"] = [t.get_text() for t in ax.get_xticklabels()]
        seen["title"] = ax.get_title()
        return original(fig, path)

    original = plots._save
    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_confusion_matrix(np.eye(2, dtype=int), ["$\\x$", "a\x07b"], tmp_path / "cm.png", title="$$")
    assert sorted(seen["x"]) == sorted(["\\$\\x\\$", "a\\x07b"]) and seen["title"] == "\\$\\$"


def test_failing_training_curve_is_a_warning(tmp_path, monkeypatch):
    from lora_cli.evaluation import plots

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"loss": 1.0, "step": 1}) + "\n")

    def broken(fig, target):
        raise OSError("disk full")

    monkeypatch.setattr(plots, "_save", broken)
    with pytest.warns(UserWarning, match=r"could not draw .*loss\.png \(OSError: disk full\)"):
        assert plots.plot_training_curves(path, tmp_path / "plots") == []


def test_damaged_metrics_lines_are_skipped(tmp_path):
    from lora_cli.evaluation.plots import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"loss": 1.0, "step": 1}\n\xff\xfe garbage\n' + b"[" * 50_000 + b'\n{"loss": 0.5, "step": 2}\n')
    assert [e["step"] for e in read_metrics(path)] == [1, 2]
