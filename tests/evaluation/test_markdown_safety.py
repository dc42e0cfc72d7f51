"""User text into Markdown, the HTML it renders to, CSV and a model card's YAML front matter
(issue 23, "user text into Markdown, HTML and model cards"): every hostile value shows as
its text and changes nothing around it. Rendered with markdown-it-py (rich's own parser),
links of every scheme allowed, so any link syntax that survives shows up as an <a>."""

from __future__ import annotations

import csv
import html
import re
import sys

import pytest

from lora_cli import rundir as rd
from lora_cli import safe_text
from lora_cli.safe_text import terminal_text
from tests.inference.runs_fixture import make_run

HOSTILE = [
    "<img src=x onerror=alert(1)>",
    '<a href="javascript:alert(1)">click</a>',
    "[click](javascript:alert(1))",
    "<javascript:alert(1)>",
    "![x](https://evil.example/t.png)",
    "a|b|c",
    "line1\nline2",
    "# heading",
    "- item",
    "---",
    "1. first",
    "`code` and ``more``",
    "*em* _em_ ~~gone~~ **bold**",
    "&#60;script&#62;alert(1)&#60;/script&#62;",
    "back\\|slash",
    "\u202eevil",
]


def render(text: str) -> str:
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark").enable("table").enable("strikethrough")
    md.validateLink = lambda url: True  # every scheme: a link that survives must show
    return md.render(text)


def visible(fragment: str) -> str:
    """The text a reader sees in rendered HTML."""
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


@pytest.mark.parametrize("value", HOSTILE)
def test_markdown_text_renders_as_the_text_itself_in_a_table(value):
    table = f"| run | n |\n|---|---:|\n| {safe_text.markdown_text(value)} | 1 |\n"
    out = render(table)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", out, flags=re.S)
    assert len(cells) == 2, out  # no cell added, none lost, still one row
    assert not re.search(r"<(a|img|script|code|em|strong|s|del|h\d|li)\b", cells[0]), out
    assert visible(cells[0]) == terminal_text(value)


@pytest.mark.parametrize("value", HOSTILE)
def test_markdown_text_renders_as_the_text_itself_in_prose(value):
    out = render(safe_text.markdown_text(value) + "\n")
    assert out.startswith("<p>") and out.count("<p>") == 1, out  # no heading, list, code block
    assert not re.search(r"<(a|img|script|code|em|strong|s|del)\b", out), out
    assert visible(out).strip() == terminal_text(value)


@pytest.mark.parametrize("value", ["0.7500", "-0.5", "1.5", "lora_r-4", "239.8 KiB", "16/32", "n/a", "1,234"])
def test_markdown_text_leaves_plain_cells_as_they_are(value):
    assert safe_text.markdown_text(value) == value


def run_cli(monkeypatch, capsys, *args):
    from lora_cli.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["loracli", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_compare_md_keeps_hostile_run_names_as_text(tmp_path, imagefolder, monkeypatch, capsys):
    names = ['<a href="javascript:alert(1)">x<', "[x](javascript:alert(1))", "a|b\nc", "# h"]
    runs = [make_run(tmp_path / "runs", name, imagefolder, seed=i) for i, name in enumerate(names)]
    code, out, err = run_cli(monkeypatch, capsys, "compare", *runs, "--md", "--no-plot")
    assert code == 0, err
    rendered = render(out)
    rows = re.findall(r"<tr>(.*?)</tr>", rendered, flags=re.S)
    header = len(re.findall(r"<th", rows[0]))
    assert len(rows) == 1 + len(names)
    for row, name in zip(rows[1:], names):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)
        assert len(cells) == header and visible(cells[0]) == terminal_text(name), rendered
    assert "<a " not in rendered and "<h1" not in rendered


def test_model_card_front_matter_and_prose_hold_against_hostile_text(tmp_path, imagefolder):
    from huggingface_hub import ModelCard

    from lora_cli.inference.push import push_run
    from tests.helpers import make_imagefolder

    classes = ("<img src=x onerror=alert(1)>", "[c](javascript:alert(1))", "x\n---\nlibrary_name: evil")
    images = make_imagefolder(tmp_path / "imgs\n---\nlibrary_name: evil\n\u202e#", classes=classes)
    run = make_run(tmp_path, "run", images, classes=classes)
    rd.write_json(run / rd.EVAL_FILE, {"accuracy": 0.5, "split": "validation\n---\nbase_model: evil",
                                       "per_class": [{"label": c} for c in classes]})
    out = tmp_path / "push"
    push_run(run, "me/hostile", dry_run=out)
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and "base_model" not in meta
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"]["name"] == terminal_text(f"local data ({images.name})")
    assert result["dataset"]["split"] == terminal_text("validation\n---\nbase_model: evil")
    front = (out / "README.md").read_text(encoding="utf-8").split("\n---\n", 1)[0]
    assert "\u202e" not in front and "\nlibrary_name: evil" not in front
    rendered = render(card.text)
    hrefs = re.findall(r'<a href="([^"]*)"', rendered)
    assert hrefs == ["https://pypi.org/project/loracli/"], hrefs  # only the card's own link
    assert re.findall(r"<img\b[^>]*>", rendered) == []  # no figures in this run: no image at all
    for label in classes:
        assert terminal_text(label) in visible(rendered)


def test_tune_results_csv_cells_are_spreadsheet_safe(tmp_path):
    import optuna

    from lora_cli.training.tune import parse_space, write_results

    param = parse_space("adapter.method=cat(lora,=1+1)")
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(
        params={"adapter.method": param.choices[1]},
        distributions={"adapter.method": optuna.distributions.CategoricalDistribution(list(param.choices))},
        value=0.5, user_attrs={"run_dir": "@SUM(1+1)"}))
    path = write_results(study, [param], tmp_path)
    rows = list(csv.reader(path.open(encoding="utf-8")))
    assert rows[1][2] == "'=1+1" and rows[1][4] == "'@SUM(1+1)"
    assert not any(cell.startswith(("=", "+", "@")) for row in rows for cell in row)
