"""Image data from CSV / JSONL files of image paths, custom columns, sample limits, digits."""

from __future__ import annotations

import csv
import json

import pytest

from lora_cli.inference.loading import load_run
from lora_cli.training.pipeline import run_training
from tests.training._util import loracli, write_recipe


def _rows(imagefolder, split):
    """(relative path, class name) of every image in one split of the test imagefolder."""
    return [(str(p.relative_to(imagefolder)), p.parent.name) for p in sorted((imagefolder / split).rglob("*.png"))]


def test_csv_of_relative_paths_with_custom_columns_and_a_carved_validation_split(tmp_path, imagefolder):
    table = imagefolder / "train.csv"  # paths are read relative to the CSV's folder
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "dish"])
        writer.writerows(_rows(imagefolder, "train"))
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run",
                          data={"imagefolder": None, "train_file": str(table), "image_column": "path",
                                "label_column": "dish", "val_split": 0.25})
    run = run_training(recipe)
    report = json.loads((run / "eval.json").read_text())
    assert report["num_samples"] == 6 and report["num_classes"] == 3  # 25% of 24 rows, stratified
    assert load_run(run).id2label == {0: "beignets", 1: "churros", 2: "macarons"}


def test_a_tab_separated_file(tmp_path, imagefolder):
    table = imagefolder / "train.tsv"
    with table.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["image", "label"])
        writer.writerows(_rows(imagefolder, "train"))
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run", training={"max_steps": 1},
                          data={"imagefolder": None, "train_file": str(table), "val_split": 0.25})
    run = run_training(recipe)
    assert load_run(run).id2label == {0: "beignets", 1: "churros", 2: "macarons"}


def test_jsonl_with_a_validation_file_and_sample_limits(tmp_path, imagefolder):
    for split, name in (("train", "train.jsonl"), ("validation", "val.jsonl")):
        with (imagefolder / name).open("w") as f:
            for path, label in _rows(imagefolder, split):
                f.write(json.dumps({"image": str(imagefolder / path), "label": label}) + "\n")
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run",
                          data={"imagefolder": None, "train_file": str(imagefolder / "train.jsonl"),
                                "validation_file": str(imagefolder / "val.jsonl"), "max_eval_samples": 5})
    run = run_training(recipe)
    assert json.loads((run / "eval.json").read_text())["num_samples"] == 5


def test_a_missing_image_in_the_csv_is_bad_input_and_writes_nothing(monkeypatch, capsys, tmp_path, imagefolder):
    table = imagefolder / "train.csv"
    table.write_text("image,label\nnot/there.png,beignets\n" + "".join(f"{p},{c}\n" for p, c in _rows(imagefolder, "train")))
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run",
                          data={"imagefolder": None, "train_file": str(table)})
    assert loracli(monkeypatch, "train", recipe) == 2
    assert "not/there.png" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("column", ["image_column", "label_column"])
def test_a_missing_column_names_the_key_and_the_real_columns(monkeypatch, capsys, tmp_path, imagefolder, column):
    table = imagefolder / "train.csv"
    table.write_text("image,label\n" + "".join(f"{p},{c}\n" for p, c in _rows(imagefolder, "train")))
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run",
                          data={"imagefolder": None, "train_file": str(table), column: "nope"})
    assert loracli(monkeypatch, "train", recipe) == 2
    err = capsys.readouterr().err
    assert f"data.{column}" in err and "image, label" in err


def test_builtin_digits_dry_run(monkeypatch, capsys, tmp_path, imagefolder):
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run",
                          data={"imagefolder": None, "builtin": "digits", "val_split": 0.2})
    assert loracli(monkeypatch, "train", recipe, "--dry-run") == 0
    assert "1437 train rows / 360 eval rows, 10 labels" in capsys.readouterr().err.replace("\n", " ")


def test_a_missing_image_far_down_the_csv_is_found_before_training(monkeypatch, capsys, tmp_path, imagefolder):
    rows = _rows(imagefolder, "train") * 60  # 1,440 rows: far past the first 1,000
    rows[1234] = ("train/churros/gone.png", "churros")
    table = imagefolder / "train.csv"
    table.write_text("image,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run",
                          data={"imagefolder": None, "train_file": str(table)})
    assert loracli(monkeypatch, "train", recipe) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "data row 1235 (line 1236)" in err and "gone.png" in err and "data.bad_images: skip" in err
    assert not (tmp_path / "run").exists()
