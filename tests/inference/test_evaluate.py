from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lora_cli.evaluation.metrics import top_k_accuracy
from lora_cli.evaluation.report import evaluate, report_tables, score, summary, write_report
from tests.helpers import CLASSES
from tests.inference.conftest import ID2LABEL


def _dataset(root, processor):
    items = []
    for label, name in enumerate(CLASSES):
        for path in sorted((root / "validation" / name).glob("*.png")):
            pixels = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"][0]
            items.append({"pixel_values": pixels, "labels": label})
    return items


def _collate(batch):
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "labels": torch.tensor([b["labels"] for b in batch]),
    }


def test_accuracy_matches_hand_computation(adapter_model, processor, imagefolder):
    data = _dataset(imagefolder, processor)
    report = evaluate(adapter_model, data, _collate, ID2LABEL, batch_size=5)
    batch = _collate(data)
    with torch.no_grad():
        logits = adapter_model(pixel_values=batch["pixel_values"]).logits
    preds = logits.argmax(-1)
    assert report["num_samples"] == len(data) == 12
    assert report["accuracy"] == pytest.approx((preds == batch["labels"]).float().mean().item())
    assert [p["predicted"] for p in report["predictions"]] == preds.tolist()
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"]).item()
    assert report["loss"] == pytest.approx(loss, rel=1e-5)
    assert report["top_k"] == 3 and report["top_k_accuracy"] == 1.0  # k = number of classes < 5


def test_scores_against_sklearn():
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 200)
    logits = rng.normal(size=(200, 7))
    logits[np.arange(200), labels] += rng.normal(1.0, 1.0, 200)  # better than chance, not perfect
    report = score(logits, labels, {i: f"c{i}" for i in range(7)})
    preds = logits.argmax(1)
    assert report["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=range(7), zero_division=0)
    assert [c["precision"] for c in report["per_class"]] == pytest.approx(p)
    assert [c["recall"] for c in report["per_class"]] == pytest.approx(r)
    assert [c["support"] for c in report["per_class"]] == s.tolist()
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert report["top_k"] == 5
    assert report["top_k_accuracy"] == pytest.approx(np.mean([y in t for y, t in zip(labels, top5, strict=True)]))
    assert 0 < report["accuracy"] < report["top_k_accuracy"] < 1
    worst = report["most_confused"][0]
    cm = np.array(report["confusion_matrix"])
    np.fill_diagonal(cm, 0)
    assert worst["count"] == cm.max()


def test_top_k_accuracy_small():
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.01, 0.05]])
    assert top_k_accuracy(logits, np.array([2, 1]), 1) == 0.0
    assert top_k_accuracy(logits, np.array([2, 1]), 2) == 0.5


def test_write_report_json_and_confusion_png(tmp_path):
    rng = np.random.default_rng(1)
    n_cls = 101  # Food-101 sized: must stay readable and fast
    labels = rng.integers(0, n_cls, 600)
    logits = rng.normal(size=(600, n_cls))
    logits[np.arange(600), labels] += 2.5
    report = score(logits, labels, {i: f"dish_{i}" for i in range(n_cls)})
    paths = write_report(report, tmp_path / "run")
    saved = json.loads(paths["json"].read_text())
    assert saved["accuracy"] == pytest.approx(report["accuracy"])
    assert len(saved["predictions"]) == 600 and saved["most_confused"]
    png = tmp_path / "run" / "plots" / "confusion_matrix.png"
    assert paths["confusion_matrix"] == png and png.stat().st_size > 10_000
    with Image.open(png) as img:
        assert min(img.size) > 1000  # scaled up with the class count

    small = score(logits[:20, :3], labels[:20] % 3, ID2LABEL)
    base = write_report(small, tmp_path / "run", name="eval_base")
    assert base["json"].name == "eval_base.json" and base["confusion_matrix"].name == "confusion_matrix_base.png"

    from rich.console import Console

    console = Console(record=True, width=160)
    console.print(*report_tables(report))
    text = console.export_text()
    assert "macro-F1" in text and "most confused" in text and "dish_" in text
    assert "predictions" not in summary(report) and "accuracy" in summary(report)


HOSTILE_NAMES = {0: "=HYPERLINK(\"http://x\")", 1: "\x1b[31mred\x1b[0m", 2: "$\\x$"}


def test_report_tables_escape_hostile_class_names():
    from rich.console import Console

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 60)
    logits = rng.normal(size=(60, 3))
    report = score(logits, labels, HOSTILE_NAMES)
    console = Console(record=True, width=200, color_system=None)
    console.print(*report_tables(report))
    text = console.export_text()
    assert "\x1b" not in text and "\\x1b[31mred\\x1b[0m" in text and "$\\x$" in text
    assert [c["label"] for c in summary(report)["per_class"]] == list(HOSTILE_NAMES.values())  # raw in --json


def test_write_report_survives_hostile_names_and_failing_plots(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 30)
    report = score(rng.normal(size=(30, 3)), labels, HOSTILE_NAMES)
    paths = write_report(report, tmp_path / "run")  # "$\x$" used to crash mathtext here, losing eval.json
    assert paths["confusion_matrix"].stat().st_size > 5_000
    assert json.loads(paths["json"].read_text())["per_class"][2]["label"] == "$\\x$"

    import lora_cli.evaluation.report as evaluate_mod

    def broken(*args, **kwargs):
        raise ValueError("no font for \x1b[2J")

    monkeypatch.setattr(evaluate_mod, "plot_confusion_matrix", broken)
    (tmp_path / "run" / "eval.json").unlink()
    with pytest.warns(UserWarning, match=r"could not draw .*confusion_matrix\.png \(ValueError: no font for \\x1b\[2J\); .*eval\.json is written"):
        paths = write_report(report, tmp_path / "run")
    assert "confusion_matrix" not in paths
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["accuracy"] == pytest.approx(report["accuracy"])
