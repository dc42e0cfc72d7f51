"""Hostile class names (and file names) through every renderer: the terminal never obeys
them, a spreadsheet never evaluates them, matplotlib never parses them, --json keeps them."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
from PIL import Image

from lora_cli.errors import UserInputError
from lora_cli.inference.predict import (
    FilePrediction,
    predictions_json,
    predictions_table,
    write_predictions_csv,
)
from lora_cli.safe_text import csv_cell, plot_label, terminal_text
from tests.helpers import class_image
from tests.training._util import loracli

HOSTILE = [
    '=HYPERLINK("http://x")',
    "+1",
    "-2",
    "@SUM(A1)",
    "\x1b[31mred\x1b[0m",
    "a\x07b",
    "\u202eevil",
    "$\\x$",
    "$$",
]
# what a terminal shows for each: the control characters as visible escapes
SHOWN = [
    '=HYPERLINK("http://x")',
    "+1",
    "-2",
    "@SUM(A1)",
    "\\x1b[31mred\\x1b[0m",
    "a\\x07b",
    "\\u202eevil",
    "$\\x$",
    "$$",
]
# what a spreadsheet cell holds for each
CELLS = [
    '\'=HYPERLINK("http://x")',
    "'+1",
    "'-2",
    "'@SUM(A1)",
    "\\x1b[31mred\\x1b[0m",
    "a\\x07b",
    "\\u202eevil",
    "$\\x$",
    "$$",
]
DANGEROUS = ["\x1b", "\x07", "\u202e", "\x9b"]


# ------------------------------------------------------------------ the neutralisers
@pytest.mark.parametrize(("raw", "shown"), list(zip(HOSTILE, SHOWN, strict=True)))
def test_terminal_text(raw, shown):
    assert terminal_text(raw) == shown


def test_terminal_text_covers_c0_del_c1_and_bidi():
    everything = "".join(map(chr, range(0x20))) + "\x7f" + "".join(map(chr, range(0x80, 0xA0)))
    everything += "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    out = terminal_text("ok" + everything + "ok")
    assert out.startswith("ok") and out.endswith("ok")
    assert out.isascii() and out.isprintable()
    assert "\\x1b" in out and "\\x9b" in out and "\\u2066" in out and "\\x0a" in out
    multi = terminal_text("line one\n\tline two\x1b[2J", keep_newlines=True)
    assert multi == "line one\n\tline two\\x1b[2J"
    assert terminal_text("café 東京 ü") == "café 東京 ü"  # ordinary text untouched


@pytest.mark.parametrize(("raw", "cell"), list(zip(HOSTILE, CELLS, strict=True)))
def test_csv_cell(raw, cell):
    assert csv_cell(raw) == cell


def test_csv_cell_tab_and_carriage_return_starts():
    assert csv_cell("\t=1") == "'\\x09=1"
    assert csv_cell("\r=1") == "'\\x0d=1"
    assert csv_cell("plain name") == "plain name" and csv_cell("") == ""


def test_plot_label_is_never_mathtext():
    from matplotlib import cbook

    for raw in HOSTILE + ["x$^{2}$", "a\\$b$", "\\"]:
        label = plot_label(raw)
        assert not cbook.is_math_text(label), label
        assert not any(c in label for c in DANGEROUS)
    assert plot_label("$\\x$") == "\\$\\x\\$"


# ------------------------------------------------------------------ predict renderers
def _results():
    rows = [FilePrediction(file=f"photos/{i}.png", labels=[name, "plain"], probabilities=[0.75, 0.25])
            for i, name in enumerate(HOSTILE)]
    rows.append(FilePrediction(file="photos/=evil\x1b]0;title\x07.png", error="could not read \x1b[2J"))
    return rows


def test_predictions_table_shows_escapes_not_controls():
    from rich.console import Console

    console = Console(record=True, width=300, color_system=None)
    console.print(predictions_table(_results()))
    text = console.export_text()
    assert not any(c in text for c in DANGEROUS)
    for shown in SHOWN:
        assert shown in text
    assert "=evil\\x1b]0;title\\x07.png" in text and "could not read \\x1b[2J" in text


def test_csv_cells_are_neutralised_and_json_stays_raw(tmp_path):
    results = _results()
    out = write_predictions_csv(results, tmp_path / "preds.csv")
    raw = out.read_text(encoding="utf-8")
    assert not any(c in raw for c in DANGEROUS)
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [r["label_1"] for r in rows[:-1]] == CELLS
    assert rows[-1]["file"] == "photos/=evil\\x1b]0;title\\x07.png"  # starts with "p": no quote needed
    assert rows[-1]["error"] == "could not read \\x1b[2J"
    assert all(not r["label_1"].startswith(("=", "+", "-", "@")) for r in rows)
    assert float(rows[0]["probability_1"]) == 0.75  # numbers stay numbers

    objs = json.loads(json.dumps(predictions_json(results)))
    assert [o["top_k"][0]["label"] for o in objs[:-1]] == HOSTILE  # --json keeps the raw values


# ------------------------------------------------------------------ through the CLI
def _hostile_run(tmp_path_factory, names):
    from lora_cli.rundir import save_label_map
    from tests.inference.test_cli import _make_run

    run = _make_run(tmp_path_factory.mktemp("hostile"))
    save_label_map(run / "adapter", dict(enumerate(names)))
    return run


GROUPS = [HOSTILE[0:3], HOSTILE[3:6], HOSTILE[6:9]]


@pytest.mark.parametrize("group", range(len(GROUPS)))
def test_predict_and_eval_with_hostile_class_names(group, tmp_path_factory, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    names = GROUPS[group]
    shown = [SHOWN[HOSTILE.index(n)] for n in names]
    cells = [CELLS[HOSTILE.index(n)] for n in names]
    run = _hostile_run(tmp_path_factory, names)
    image = tmp_path / "one.png"
    class_image(0, np.random.default_rng(0)).save(image)
    capsys.readouterr()  # whatever building the run printed

    # --json: the raw names
    assert loracli(monkeypatch, "predict", image, "--run", run, "--json", "--top-k", "3",
                    "--csv", tmp_path / "p.csv") == 0
    captured = capsys.readouterr()
    assert sorted(p["label"] for p in json.loads(captured.out)[0]["top_k"]) == sorted(names)
    # --csv: neutralised cells
    row = next(csv.DictReader((tmp_path / "p.csv").open(encoding="utf-8")))
    assert sorted(row[f"label_{i}"] for i in (1, 2, 3)) == sorted(cells)
    # the table: visible escapes, no control characters
    assert loracli(monkeypatch, "predict", image, "--run", run, "--top-k", "3") == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in DANGEROUS) and all(s in out for s in shown)

    # eval: tables, eval.json (raw names) and the confusion matrix (the plot must not crash)
    assert loracli(monkeypatch, "eval", run) == 0
    captured = capsys.readouterr()
    assert not any(c in captured.out + captured.err for c in DANGEROUS)
    assert any(s in captured.out for s in shown)
    saved = json.loads((run / "eval.json").read_text(encoding="utf-8"))
    assert [c["label"] for c in saved["per_class"]] == names
    png = run / "plots" / "confusion_matrix.png"
    with Image.open(png) as img:
        assert img.size[0] > 300


def test_csv_never_overwrites_an_input_image(tmp_path):
    image = tmp_path / "cake.png"
    class_image(0, np.random.default_rng(0), 16).save(image)
    before = image.read_bytes()
    results = [FilePrediction(file=str(image), labels=["a"], probabilities=[1.0])]
    with pytest.raises(UserInputError, match="is one of the images being predicted"):
        write_predictions_csv(results, image)
    with pytest.raises(UserInputError, match="is a folder"):
        write_predictions_csv(results, tmp_path)
    assert image.read_bytes() == before


def test_warnings_reach_the_user_as_one_plain_line(tmp_path):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "lora_cli", "train", str(root / "recipes" / "quickstart.yaml"), "--dry-run",
         "training.fp16=true", f"output_dir={tmp_path / 'run'}", "data.max_train_samples=20"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning: training.fp16: no CUDA device here" in proc.stderr
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr
