"""`loracli sweep`: axes -> points, method options carried across methods, invalid points
reported while the others train, and the comparison at the end."""

from __future__ import annotations

import json

import pytest

from lora_cli.errors import UserInputError
from lora_cli.recipe import load_recipe
from lora_cli.recipe.adapter import carry_options
from lora_cli.training.sweep import parse_axes, plan, point_name, split_values
from tests.training._util import loracli, write_recipe


def test_values_split_on_top_level_commas_only():
    assert split_values("lora,loha") == ["lora", "loha"]
    assert split_values("[q, v],[q],'a,b'") == ["[q, v]", "[q]", "'a,b'"]


def test_axes_and_fixed_overrides():
    axes, fixed = parse_axes(["adapter.method=lora,loha", "training.max_steps=2", "~adapter.lora_dropout"])
    assert axes == {"adapter.method": ["lora", "loha"]}
    assert fixed == ["training.max_steps=2", "~adapter.lora_dropout"]
    with pytest.raises(UserInputError, match="no axis given"):
        parse_axes(["training.max_steps=2"])
    with pytest.raises(UserInputError, match="empty value"):
        parse_axes(["adapter.r=4,"])
    with pytest.raises(UserInputError, match="not of the form"):
        parse_axes(["adapter.method=lora,loha", "oops"])


def test_point_names():
    assert point_name({"adapter.method": "lokr", "adapter.r": "8"}) == "lokr_r-8"
    assert point_name({"training.learning_rate": "1e-3"}) == "learning_rate-1e-3"
    assert point_name({"adapter.target_modules": "[q, v]"}) == "target_modules-q-v"


def test_method_options_carry_over():
    options = {"r": 16, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q"], "use_dora": True}
    loha, notes = carry_options(options, "loha", given=set())
    assert loha == {"r": 16, "alpha": 16, "target_modules": ["q"]}
    assert "lora_alpha 16 -> alpha 16" in notes and any(n.startswith("dropped use_dora") for n in notes)
    adalora, notes = carry_options(options, "adalora", given=set())
    assert adalora["init_r"] == 16 and adalora["target_r"] == 11 and "r" not in adalora
    assert adalora["lora_alpha"] == 16 and adalora["use_dora"] is True
    # an axis that sets the option itself is never overridden
    loha, _ = carry_options(options, "loha", given={"adapter.alpha"})
    assert "alpha" not in loha


def test_plan_reports_the_invalid_points_only(tmp_path, imagefolder):
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "runs" / "tiny")
    sweep_dir, points = plan(recipe, ["adapter.method=lora,loha", "adapter.r=4,0"])
    assert sweep_dir == tmp_path / "runs" / "tiny-sweep"
    assert [p.name for p in points] == ["lora_r-4", "lora_r-0", "loha_r-4", "loha_r-0"]
    assert [p.error is None for p in points] == [True, False, True, False]
    assert "override 'adapter.r=0': adapter.r: must be an integer >= 1" in points[1].error
    loha = load_recipe(points[2].recipe, points[2].overrides)
    assert loha.adapter.method == "loha" and loha.adapter.options["alpha"] == 8 and loha.adapter.options["r"] == 4
    assert loha.output_path == sweep_dir / "loha_r-4" and loha.name == "tiny-loha_r-4"
    assert points[0].recipe == recipe  # no method change: the recipe itself, with overrides


def test_broken_base_recipe_stops_the_sweep(tmp_path, imagefolder, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run")
    assert loracli(monkeypatch, "sweep", recipe, "adapter.method=lora,loha", "training.learnin_rate=1") == 2
    assert "did you mean" in capsys.readouterr().err
    assert not (tmp_path / "tiny-sweep").exists()


@pytest.mark.slow
def test_sweep_trains_the_valid_points_and_compares(tmp_path, imagefolder, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "runs" / "tiny")
    args = ["sweep", recipe, "adapter.method=lora,loha", "adapter.r=4,0", "--json"]
    assert loracli(monkeypatch, *args) == 1  # two points are invalid
    out, errors = capsys.readouterr()
    sweep_dir = tmp_path / "runs" / "tiny-sweep"
    rows = json.loads(out[out.index("["):])
    assert [r["run"] for r in rows] == ["lora_r-4", "loha_r-4"]
    assert [r["method"] for r in rows] == ["lora", "loha"]
    assert all(r["peak_memory_bytes"] and r["samples_per_second"] and r["accuracy"] is not None for r in rows)
    assert "2 of 4 sweep point(s) failed" in errors and "lora_r-0" in errors
    record = json.loads((sweep_dir / "sweep.json").read_text())["points"]
    assert {k: v["state"] for k, v in record.items()} == {
        "lora_r-4": "completed", "lora_r-0": "invalid", "loha_r-4": "completed", "loha_r-0": "invalid"}
    assert (sweep_dir / "compare.png").is_file()
    before = (sweep_dir / "lora_r-4" / "train.json").read_bytes()
    # again: the completed points are kept, not retrained
    assert loracli(monkeypatch, *args[:-1], "--md") == 1
    out, errors = capsys.readouterr()
    assert "completed earlier, kept" in errors and out.startswith("| run | method |")
    assert (sweep_dir / "lora_r-4" / "train.json").read_bytes() == before
