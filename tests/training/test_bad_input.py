"""Bad input to `loracli train`: exit code 2, one message naming the problem, no traceback,
and nothing written (the run directory does not appear)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import message_lines
from tests.training._util import loracli, recipe_dict, write_recipe


def _set(recipe: dict, dotted: str, value) -> dict:
    *parents, last = dotted.split(".")
    node = recipe
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return recipe


def _drop(recipe: dict, dotted: str) -> dict:
    *parents, last = dotted.split(".")
    node = recipe
    for key in parents:
        node = node[key]
    node.pop(last)
    return recipe


# id -> (recipe changes {dotted key: value}, overrides, message fragment)
RECIPE_CASES = {
    "unknown top-level key": ({"nmae": "x"}, [], "nmae"),
    "unknown model key": ({"model.confg": {}}, [], "confg"),
    "unknown data key": ({"data.imagefolders": "x"}, [], "imagefolders"),
    "unknown adapter key": ({"adapter.lora_alpah": 8}, [], "lora_alpah"),
    "unknown training key": ({"training.learning_rat": 0.1}, [], "learning_rat"),
    "wrong type": ({"adapter.r": "four"}, [], "adapter.r"),
    "wrong training type": ({"training.max_steps": "many"}, [], "max_steps"),
    "wrong top-level type": ({"seed": "abc"}, [], "seed"),
    "wrong data type": ({"data.max_train_samples": "ten"}, [], "max_train_samples"),
    "wrong override type": ({}, ["adapter.r=four"], "adapter.r"),
    "r zero": ({"adapter.r": 0}, [], "adapter.r"),
    "r negative": ({"adapter.r": -2}, [], "adapter.r"),
    "dropout 1": ({"adapter.lora_dropout": 1.0}, [], "lora_dropout"),
    "dropout negative": ({"adapter.lora_dropout": -0.1}, [], "lora_dropout"),
    "unknown method": ({"adapter.method": "lorax"}, [], "lorax"),
    "unknown init": ({"adapter.init_lora_weights": "bogus"}, [], "init_lora_weights"),
    "targets match nothing": ({"adapter.target_modules": ["no_such_layer"]}, [], "no_such_layer"),
    "missing data folder": ({"data.imagefolder": "/nonexistent/images"}, [], "/nonexistent/images"),
    "missing label column": ({"data.label_column": "nope"}, [], "nope"),
    "override of unknown key": ({}, ["adapter.nope=1"], "nope"),
    "override of unknown section": ({}, ["nosuch.key=1"], "nosuch"),
    "override of unknown training key": ({}, ["training.learning_rat=0.1"], "learning_rat"),
    "loracli-managed training key": ({"training.seed": 3}, [], "seed"),
}


@pytest.mark.parametrize("changes, overrides, fragment", RECIPE_CASES.values(), ids=RECIPE_CASES.keys())
def test_bad_recipe_exits_2_and_writes_nothing(tmp_path, imagefolder, monkeypatch, capsys, changes, overrides, fragment):
    recipe = recipe_dict(imagefolder, tmp_path / "run")
    for key, value in changes.items():
        _set(recipe, key, value)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    _assert_rejected(monkeypatch, capsys, ["train", path, *overrides], fragment, tmp_path / "run")


def test_adalora_schedule_without_budgeting_phase(tmp_path, imagefolder, monkeypatch, capsys):
    # 24 images, batch 4, 1 epoch: total_step 6, and tinit + tfinal = 6 leaves no budgeting
    recipe = recipe_dict(imagefolder, tmp_path / "run", "adalora", adapter={"tinit": 3, "tfinal": 3})
    _drop(recipe, "training.max_steps")
    recipe["training"]["num_train_epochs"] = 1
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    _assert_rejected(monkeypatch, capsys, ["train", path], "tfinal", tmp_path / "run")


def test_hub_model_offline_fails_fast(tmp_path, imagefolder, monkeypatch, capsys):
    from lora_cli import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_reachable.cache_clear()
    recipe = recipe_dict(imagefolder, tmp_path / "run", model={"name_or_path": "google/vit-base-patch16-224-in21k"})
    recipe["model"].pop("config")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    start = time.perf_counter()
    err = _assert_rejected(monkeypatch, capsys, ["train", path], "google/vit-base-patch16-224-in21k", tmp_path / "run")
    # no minute of hub retries (a generous bound: CI shares two cores with other work)
    assert time.perf_counter() - start < 20
    assert "unreachable" in err and "local" in err


FILE_CASES = {
    "missing file": (None, "not found"),
    "empty file": ("", "empty"),
    "yaml syntax error": ("name: tiny\nmodel: [unclosed\n", "line"),
    "not a mapping": ("- a\n- b\n", "mapping"),
}


@pytest.mark.parametrize("text, fragment", FILE_CASES.values(), ids=FILE_CASES.keys())
def test_bad_recipe_file(tmp_path, monkeypatch, capsys, text, fragment):
    path = tmp_path / "recipe.yaml"
    if text is not None:
        path.write_text(text)
    monkeypatch.chdir(tmp_path)  # a recipe without output_dir would write to ./runs
    _assert_rejected(monkeypatch, capsys, ["train", path], fragment, tmp_path / "runs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if text is None else ["recipe.yaml"])


def test_existing_run_dir_needs_resume_or_overwrite(tmp_path, imagefolder, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("earlier work")
    path = write_recipe(tmp_path / "recipe.yaml", imagefolder, run)
    code = loracli(monkeypatch, "train", path)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "already exists" in err and "--overwrite" in err and "--resume" in err
    assert [p.name for p in run.iterdir()] == ["keep.txt"]


def test_resume_without_checkpoints(tmp_path, imagefolder, monkeypatch, capsys):
    path = write_recipe(tmp_path / "recipe.yaml", imagefolder, tmp_path / "run")
    _assert_rejected(monkeypatch, capsys, ["train", path, "--resume"], "nothing to resume", tmp_path / "run")


def test_debug_shows_the_traceback(tmp_path, imagefolder, monkeypatch, capsys):
    path = write_recipe(tmp_path / "recipe.yaml", imagefolder, tmp_path / "run", adapter={"r": 0})
    assert loracli(monkeypatch, "--debug", "train", path) == 2
    assert "Traceback" in capsys.readouterr().err


def test_real_process_exit_code_and_no_traceback(tmp_path, imagefolder):
    """The installed console script, in its own process: code 2 and one short message."""
    script = Path(sys.executable).with_name("loracli")
    path = write_recipe(tmp_path / "recipe.yaml", imagefolder, tmp_path / "run", adapter={"lora_alpah": 8})
    env = os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    done = subprocess.run([str(script), "train", str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "lora_alpah" in done.stderr and "lora_alpha" in done.stderr  # did you mean
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) <= 4
    assert not (tmp_path / "run").exists()


def _assert_rejected(monkeypatch, capsys, argv, fragment: str, run_dir: Path) -> str:
    code = loracli(monkeypatch, *argv)
    out, err = capsys.readouterr()
    assert code == 2, f"exit code {code}\n{err}"
    assert fragment in err, err
    shown = "\n".join(message_lines(err))  # the data phases' progress lines may come first
    assert shown.startswith("error:") and shown.count("\nerror:") == 0 and "Traceback" not in err, err
    assert not run_dir.exists(), f"{run_dir} was written"
    return err
