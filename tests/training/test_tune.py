"""`loracli tune`: search-space parsing, trials as run directories, pruning, resuming, the outputs."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest

from lora_cli import rundir as rd
from lora_cli.errors import UserInputError
from lora_cli.recipe import load_recipe
from lora_cli.training.tune import Param, PruningCallback, parse_space, trial_overrides, tune
from tests.training._util import loracli, write_recipe

SPACE = ["adapter.r=int(2,8,log)", "training.learning_rate=float(1e-3,5e-2,log)", "adapter.method=cat(lora,loha)"]


@pytest.fixture
def recipe(tmp_path, imagefolder):
    return write_recipe(tmp_path / "recipe.yaml", imagefolder, tmp_path / "run",
                        training={"eval_strategy": "steps", "eval_steps": 2, "max_steps": 4})


@pytest.mark.parametrize(("item", "expected"), [
    ("adapter.r=int(4,64,log)", Param("adapter.r", "int", 4, 64, True)),
    ("training.learning_rate = float(1e-4, 1e-2)", Param("training.learning_rate", "float", 1e-4, 1e-2)),
    ("adapter.method=cat(lora,loha,lokr)", Param("adapter.method", "cat", choices=("lora", "loha", "lokr"))),
    ("training.per_device_train_batch_size=cat(4, 8)", Param("training.per_device_train_batch_size", "cat",
                                                              choices=(4, 8))),
])
def test_space_items_parse(item, expected):
    assert parse_space(item) == expected


@pytest.mark.parametrize(("item", "why"), [
    ("adapter.r", "is not of the form key=kind"),
    ("adapter.r=uniform(1,2)", "is not of the form key=kind"),
    ("adapter.r=int(8,4)", "low bound must be below the high bound"),
    ("adapter.r=int(1.5,4)", "bounds must be whole numbers"),
    ("training.learning_rate=float(0,1,log)", "log scale needs a low bound above 0"),
    ("training.learning_rate=float(1e-4,1e-2,lin)", "takes low,high or low,high,log"),
    ("adapter.method=cat(lora,,loha)", "one or more comma-separated choices"),
    ("adapter.method=cat(lora,lora)", "choices must be distinct"),
])
def test_bad_space_items_name_the_item_and_the_fix(item, why):
    with pytest.raises(UserInputError, match=why) as info:
        parse_space(item)
    assert f"--space {item!r}" in str(info.value) and "key=int(low,high[,log])" in str(info.value)


def test_cli_refuses_bad_spaces_and_writes_nothing(monkeypatch, capsys, tmp_path, recipe):
    out = tmp_path / "search"
    assert loracli(monkeypatch, "tune", recipe, "--space", "adapter.r=int(8,4)", "--out", out) == 2
    assert "--space 'adapter.r=int(8,4)'" in capsys.readouterr().err
    assert loracli(monkeypatch, "tune", recipe, "--space", "adapter.rr=int(2,8)", "--out", out) == 2
    assert "did you mean adapter.r" in capsys.readouterr().err
    assert loracli(monkeypatch, "tune", recipe, "--space", "adapter.r=int(2,8)", "--direction", "up",
                   "--out", out) == 2
    assert not out.exists()


def test_a_sampled_method_rewrites_the_adapter_section(recipe):
    loaded = load_recipe(recipe)  # lora with r 4, lora_alpha 8
    overrides = trial_overrides(loaded, {"adapter.method": "loha", "adapter.r": 2, "training.learning_rate": 0.01})
    trial = load_recipe(recipe, overrides)
    assert trial.adapter.method == "loha" and trial.adapter.options["alpha"] == 8 and trial.adapter.options["r"] == 2
    assert "lora_alpha" not in trial.adapter.options and trial.training["learning_rate"] == 0.01


def test_pruning_callback_reports_each_step_once_and_stops_the_run():
    reported = []
    trial = SimpleNamespace(report=lambda value, step: reported.append((step, value)), should_prune=lambda: True)
    callback = PruningCallback(trial, "eval_accuracy")
    control = SimpleNamespace(should_training_stop=False)
    callback.on_evaluate(None, SimpleNamespace(global_step=2), control, metrics={"eval_accuracy": 0.5})
    callback.on_evaluate(None, SimpleNamespace(global_step=2), control, metrics={"eval_accuracy": 0.5})
    assert reported == [(2, 0.5)] and control.should_training_stop and callback.pruned


@pytest.mark.slow
def test_search_trains_runs_resumes_and_writes_its_outputs(tmp_path, recipe):
    import optuna

    out = tmp_path / "search"
    result = tune(recipe, SPACE, trials=3, metric="eval_accuracy", out=out)
    trials = result.study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    for t in trials:
        run = out / f"trial-{t.number:04d}"
        assert rd.is_run_dir(run) and rd.read_status(run)["state"] == "completed"
        saved = load_recipe(run / "recipe.yaml")
        assert saved.adapter.method == t.params["adapter.method"] and saved.adapter.options["r"] == t.params["adapter.r"]
        assert json.loads((run / "eval.json").read_text())["trainer"]["eval_accuracy"] == t.value
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["state"] for r in rows] == ["complete"] * 3 and rows[0]["adapter.method"] == trials[0].params["adapter.method"]
    assert (out / "param_importances.png").stat().st_size > 1000
    best = load_recipe(out / "best_recipe.yaml")
    assert best.training["learning_rate"] == result.study.best_params["training.learning_rate"]
    assert best.adapter.method == result.study.best_params["adapter.method"]

    # a search killed mid-trial: the trial it left running is closed as failed, the count goes on
    study = optuna.load_study(study_name="loracli-tune", storage=f"sqlite:///{out / 'study.db'}")
    study.ask()
    again = tune(recipe, SPACE, trials=4, metric="eval_accuracy", out=out)
    states = [t.state.name for t in again.study.trials]
    assert states == ["COMPLETE"] * 3 + ["FAIL", "COMPLETE"] and (out / "trial-0004" / "adapter").is_dir()
    with pytest.raises(UserInputError, match="holds another search \\(space differ\\)"):
        tune(recipe, SPACE[:1], trials=4, metric="eval_accuracy", out=out)


@pytest.mark.slow
def test_pruned_trials_are_complete_runs_and_unknown_metrics_are_named(tmp_path, recipe):
    import optuna

    out = tmp_path / "pruned"
    with pytest.warns(UserWarning, match="0 completed trial\\(s\\): the importance figure needs at least 2"):
        result = tune(recipe, SPACE[:1], trials=2, metric="eval_accuracy", out=out,
                      pruner=optuna.pruners.ThresholdPruner(lower=2.0))  # accuracy is always below 2: prune at once
    assert [t.state.name for t in result.study.trials] == ["PRUNED", "PRUNED"]
    run = out / "trial-0000"
    assert rd.read_status(run)["state"] == "completed" and (run / "adapter" / "adapter_config.json").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("step", 0) for m in metrics) == 2  # stopped at the first evaluation of 4 steps
    assert not (out / "param_importances.png").exists() and not (out / "best_recipe.yaml").exists()
    with pytest.raises(UserInputError, match="--metric eval_acc: an image-classification run reports .*eval_accuracy"):
        tune(recipe, SPACE[:1], trials=1, metric="eval_acc", out=tmp_path / "other")  # before trial 1
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(("item", "value"), [
    ("adapter.r=int(1,1e11)", "100000000000"),  # a whole number in float notation is an int() bound
    ("adapter.r=int(1,100000000000,log)", "100000000000"),
    ("adapter.r=cat(4,1000000000)", "1000000000"),
])
def test_a_space_past_the_engine_limits_is_refused_before_trial_1(item, value, monkeypatch, capsys, tmp_path, recipe):
    """Before: the trials ran and died in the allocator. Now: exit 2 naming the --space item and the limit."""
    out = tmp_path / "search"
    assert loracli(monkeypatch, "tune", recipe, "--space", item, "--trials", "1", "--out", out) == 2
    err = capsys.readouterr().err
    assert f"--space {item!r}: the value {value} makes an invalid recipe" in err
    assert "adapter.r: must be an integer between 1 and 65536" in err and "Traceback" not in err
    assert not out.exists()


def test_int_bounds_take_whole_numbers_in_float_notation():
    assert parse_space("adapter.r=int(1,1e3)") == Param("adapter.r", "int", 1, 1000)


@pytest.mark.slow
def test_cli_says_each_trial_as_it_starts_and_how_it_ended(tmp_path, recipe, monkeypatch, capsys):
    out = tmp_path / "search"
    space = ["adapter.r=int(2,8)", "training.learning_rate=float(1e-3,5e-2,log)"]
    assert loracli(monkeypatch, "tune", recipe, *sum([["--space", s] for s in space], []), "--trials", "2",
                   "--out", out) == 0
    err = capsys.readouterr().err
    import optuna

    study = optuna.load_study(study_name="loracli-tune", storage=f"sqlite:///{out / 'study.db'}")
    lines = err.splitlines()
    for n, trial in enumerate(study.trials, 1):
        r, lr = trial.params["adapter.r"], trial.params["training.learning_rate"]
        start = f"trial {n} of 2 ({out / f'trial-{trial.number:04d}'}): adapter.r={r} training.learning_rate={lr:.4g}"
        end = f"trial {n} of 2: eval_accuracy {trial.value:.4f}"
        assert start in lines and any(line.startswith(end) for line in lines), err
        assert lines.index(start) < next(i for i, line in enumerate(lines) if line.startswith(end))
