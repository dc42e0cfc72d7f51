"""The one folder rule (lora_cli/rundir/guard.py) held by every verb that writes a folder or a
figure: hostile targets are refused with exit 2 and one line, and nothing anywhere changes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lora_cli import rundir as rd
from tests.helpers import make_imagefolder
from tests.inference.runs_fixture import make_run
from tests.training._util import write_recipe

TARGETS = ("user-files", "config-only", "deep-run", "cwd", "input", "ancestor", "inside")
OWN_OUTPUT = {
    "merge": {"merge.json": "{}", "config.json": "{}"},
    "export": {"export.json": "{}", "config.json": "{}"},
    "combine": {"combine.json": "{}", rd.RECIPE_FILE: "name: ab\n", rd.ENV_FILE: "{}"},
    "convert": {"convert.json": "{}", rd.RECIPE_FILE: "name: ab\n", rd.ENV_FILE: "{}"},
    "push": {}, "sweep": {}, "tune": {},
}
"""What each verb's own earlier output holds at its top: given to the deep-run folder, so that
only the run several levels down can stop the replacement (push never replaces; sweep and
tune add to their folder instead)."""


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (folders as None, files as their bytes)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    from lora_cli.cli import main

    capsys.readouterr()  # what the test's set-up printed is not the command's
    monkeypatch.setattr(sys, "argv", ["loracli", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Runs, a recipe with its data, and the hostile targets around them."""
    root = tmp_path_factory.mktemp("world")
    images = make_imagefolder(root / "data" / "images")
    runs = {name: make_run(root / "runs", name, images, method=method, seed=seed)
            for name, method, seed in (("a", "lora", 1), ("b", "lora", 2), ("h", "loha", 3))}
    recipe = write_recipe(root / "recipe.yaml", images, root / "runs" / "tiny")
    user = root / "user-files"
    (user / "notes").mkdir(parents=True)
    (user / "thesis.tex").write_text("years of work")
    (user / "notes" / "a.txt").write_text("more")
    (root / "config-only").mkdir()
    (root / "config-only" / "config.json").write_text('{"model_type": "mine"}')
    deep = root / "deep-run"
    nested = deep / "x" / "y" / "z" / "w" / "run"  # five levels down: past any fixed depth
    nested.mkdir(parents=True)
    (nested / rd.RECIPE_FILE).write_text("name: mine\n")
    (nested / rd.ENV_FILE).write_text("{}\n")
    (nested / "weights.bin").write_bytes(b"precious")
    (root / "work").mkdir()
    (root / "work" / "todo.txt").write_text("the working directory")
    return {"root": root, "images": images, "runs": runs, "recipe": recipe}


def _target(world, verb: str, target: str) -> Path:
    root, runs = world["root"], world["runs"]
    reads_runs = verb not in ("sweep", "tune")
    source = runs["h"] if verb == "convert" else runs["a"]
    return {
        "user-files": root / "user-files",
        "config-only": root / "config-only",
        "deep-run": root / "deep-run",
        "cwd": root / "work",
        "input": source if reads_runs else world["images"],
        "ancestor": root / "runs" if reads_runs else root / "data",
        "inside": source / "adapter" / "new" if reads_runs else world["images"] / "new",
    }[target]


def _command(world, verb: str, out: Path) -> list[str]:
    runs, recipe = world["runs"], world["recipe"]
    return {
        "merge": ["merge", runs["a"], "--out", out, "--force", "--n", "2"],
        "export": ["export", runs["a"], "--out", out, "--force", "--n", "2"],
        "combine": ["combine", runs["a"], runs["b"], "--out", out, "--overwrite"],
        "convert": ["convert", runs["h"], "--rank", "2", "--out", out, "--overwrite"],
        "push": ["push", runs["a"], "me/x", "--dry-run", out],
        # --dry-run: the point recipes of loha are what a sweep writes first
        "sweep": ["sweep", recipe, "adapter.method=lora,loha", "--out", out, "--dry-run"],
        "tune": ["tune", recipe, "--space", "adapter.r=int(2,4)", "--trials", "1", "--out", out],
    }[verb]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("verb", list(OWN_OUTPUT))
def test_hostile_targets_are_refused_and_nothing_changes(world, verb, target, monkeypatch, capsys):
    root = world["root"]
    out = _target(world, verb, target)
    own = OWN_OUTPUT[verb] if target == "deep-run" else {}
    for name, text in own.items():
        (out / name).write_text(text)
    monkeypatch.chdir(root / "work")
    before = snapshot(root)
    try:
        code, err = run_cli(monkeypatch, capsys, *_command(world, verb, out))
        lines = err.strip().splitlines()
        assert code == 2, err
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert snapshot(root) == before
    finally:
        for name in own:
            (out / name).unlink(missing_ok=True)


@pytest.mark.parametrize("target", ["user-file", "folder", "run-plot", "cwd"])
def test_compare_figure_never_over_a_file_it_did_not_write(world, target, monkeypatch, capsys):
    from PIL import Image

    root, runs = world["root"], world["runs"]
    mine = root / "user-files" / "plot.png"
    if not mine.exists():
        Image.new("RGB", (4, 4)).save(mine)
    plot = {"user-file": mine, "folder": root / "config-only", "run-plot": runs["a"] / "plots" / "new.png",
            "cwd": root / "work"}[target]
    monkeypatch.chdir(root / "work")
    before = snapshot(root)
    code, err = run_cli(monkeypatch, capsys, "compare", runs["a"], runs["b"], "--plot", plot)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert snapshot(root) == before
