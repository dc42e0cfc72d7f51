"""training.report_to: checked at the recipe line, passed to the Trainer, the recipe and
the trainable-parameter line logged; TensorBoard and MLflow read back with their own readers."""

from __future__ import annotations

import json

import pytest

from lora_cli.recipe import RecipeError, load_recipe
from lora_cli.recipe import training as recipe_training
from lora_cli.training.tracking import check_trackers, flat_recipe, tracking_arguments
from tests.training._util import loracli, write_recipe


def _problems(path, *overrides) -> list[str]:
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, list(overrides))
    return [p.render() for p in exc.value.problems]


def _line_of(path, key: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip().startswith(f"{key}:"))


# ------------------------------------------------------------------ the recipe
def test_report_to_values(tmp_path, imagefolder):
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run")
    for value in ("tensorboard", "[tensorboard, mlflow]", "none", "wandb", "trackio"):
        loaded = load_recipe(recipe, [f"training.report_to={value}"])
        assert loaded.training["report_to"] in (value, ["tensorboard", "mlflow"])
    assert tracking_arguments(load_recipe(recipe))["report_to"] == "none"
    kwargs = tracking_arguments(load_recipe(recipe, ["training.report_to=[tensorboard]"]))
    assert kwargs == {"report_to": ["tensorboard"], "run_name": "tiny", "project": "loracli"}


def test_bad_report_to_is_reported_with_the_fix(tmp_path, imagefolder):
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run")
    (line,) = _problems(recipe, "training.report_to=tensorbord")
    assert "training.report_to: names an unknown tracker 'tensorbord'" in line and "did you mean tensorboard?" in line
    (line,) = _problems(recipe, "training.report_to=all")
    assert "cannot be 'all'" in line and "[tensorboard, mlflow]" in line
    (line,) = _problems(recipe, "training.report_to=3")
    assert "must be a tracker name or a list of them" in line


def test_missing_package_names_the_recipe_line_and_the_install(tmp_path, imagefolder, monkeypatch, capsys):
    monkeypatch.setitem(recipe_training.TRACKERS, "trackio", (("loracli_no_such_module",), "pip install trackio"))
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, run, training={"report_to": ["trackio"]})
    assert loracli(monkeypatch, "train", recipe) == 2
    message = capsys.readouterr().err
    assert f"r.yaml:{_line_of(recipe, 'report_to')}: training.report_to: needs the trackio package" in message
    assert "pip install trackio" in message and "remove trackio from training.report_to" in message
    assert not run.exists()  # found before anything is written


def test_wandb_without_a_key_must_say_offline(tmp_path, imagefolder, monkeypatch):
    monkeypatch.setitem(recipe_training.TRACKERS, "wandb", (("json",), "pip install wandb"))  # "installed"
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run",
                                      training={"report_to": "wandb"}))
    with pytest.raises(RecipeError, match="WANDB_MODE=offline"):
        check_trackers(recipe)
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_trackers(recipe)  # offline: logs into the run directory, nothing to refuse


def test_flat_recipe_is_the_resolved_recipe(tmp_path, imagefolder):
    flat = flat_recipe(load_recipe(write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run")))
    assert flat["adapter.method"] == "lora" and flat["adapter.r"] == 4 and flat["training.max_steps"] == 4
    assert flat["adapter.target_modules"] == "['query', 'value']"


# ------------------------------------------------------ the real trackers, offline
@pytest.mark.slow
def test_tensorboard_and_mlflow_in_the_run_directory(tmp_path, imagefolder, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory stays here
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.setenv(name, "")  # unset for loracli; monkeypatch restores what it sets
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, run, training={"report_to": ["tensorboard", "mlflow"]})
    assert loracli(monkeypatch, "train", recipe) == 0
    capsys.readouterr()

    # loracli's own files are still there
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "loss" in e] == [1, 2, 3, 4]
    assert (run / "plots" / "loss.png").is_file()

    # TensorBoard: the Trainer's scalars and loracli's recipe text + hparams, in logs/tensorboard
    (logdir,) = {p.parent for p in (run / "logs" / "tensorboard").rglob("events.out.tfevents.*")}
    assert logdir == run / "logs" / "tensorboard"
    tb = EventAccumulator(str(logdir), size_guidance={"tensors": 0, "scalars": 0})
    tb.Reload()
    assert [s.step for s in tb.Scalars("train/loss")] == [1, 2, 3, 4]
    text = tb.Tensors("loracli/recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "method: lora" in text and "max_steps: 4" in text
    line = tb.Tensors("loracli/trainable_parameters/text_summary")[0].tensor_proto.string_val[0].decode()
    assert line.startswith("trainable params: ") and "trainable%: " in line
    assert "_hparams_/session_start_info" in tb.summary_metadata

    # MLflow: a SQLite store in logs/, its artifacts beside it
    assert (run / "logs" / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{run / 'logs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    (found,) = client.search_runs([experiment.experiment_id])
    params, tags = found.data.params, found.data.tags
    assert params["loracli.adapter.method"] == "lora" and params["loracli.adapter.r"] == "4"
    assert int(params["loracli.trainable_params"]) > 0 and params["learning_rate"] == "0.01"  # the Trainer's own
    assert tags["loracli.trainable_parameters"] == line and found.info.run_name == "tiny"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "loss")] == [1, 2, 3, 4]
    # the evaluation `train` runs after training lands in the same run, which is then closed
    assert len(client.get_metric_history(found.info.run_id, "eval_accuracy")) == 1
    assert found.info.status == "FINISHED"
    local = client.download_artifacts(found.info.run_id, "loracli/recipe.yaml", str(tmp_path))
    assert load_recipe(local) == load_recipe(run / "recipe.yaml")
    assert (run / "logs" / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_mlflow_store_the_user_names(tmp_path, imagefolder, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, run, training={"report_to": "mlflow"})
    assert loracli(monkeypatch, "train", recipe) == 0
    capsys.readouterr()
    assert not (run / "logs" / "mlflow.db").exists()
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert found.data.params["loracli.name"] == "tiny"


@pytest.mark.parametrize("store", ["file://{tmp}/mlruns", "{tmp}/mlruns", "./mlruns"])
def test_mlflow_file_store_is_refused_before_training_with_mlflows_advice(tmp_path, imagefolder, monkeypatch,
                                                                          capsys, store):
    """MLflow 3 refuses a file store (`file://...`, a plain path) unless MLFLOW_ALLOW_FILE_STORE
    is set; the Trainer found out at its first step (exit 1, "run again with --debug")."""
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.format(tmp=tmp_path))
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, run, training={"report_to": "mlflow"})
    assert loracli(monkeypatch, "train", recipe) == 2
    message = capsys.readouterr().err
    assert f"r.yaml:{_line_of(recipe, 'report_to')}: training.report_to:" in message
    assert "MLFLOW_TRACKING_URI" in message and "sqlite:///" in message and "MLFLOW_ALLOW_FILE_STORE" in message
    assert "--debug" not in message
    assert not run.exists() and not (tmp_path / "mlruns").exists()  # nothing written, the store not created
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's opt-out: then it is the user's choice
    check_trackers(load_recipe(recipe))
    assert not (tmp_path / "mlruns").exists()
