"""Run directories under hostile or unlucky use: nothing that is not a run is ever deleted,
one process trains into a run at a time, checkpoints are complete or absent, and a failed
run never blocks the next attempt (issue 11, "data loss")."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import TrainerCallback

from lora_cli import rundir as rd
from lora_cli.errors import LoraCliError, UserInputError
from lora_cli.training.pipeline import run_training
from lora_cli.training.trainer import AdapterTrainer
from tests.training._util import loracli, write_recipe

CHECKPOINTING = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2}


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "notes").mkdir()
    (path / "notes" / "a.txt").write_text("more")
    return path


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ------------------------------------------------------------------ --overwrite
def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, imagefolder, monkeypatch, capsys):
    folder = _user_folder(tmp_path / "mine")
    before = _tree(folder)
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, folder)
    assert loracli(monkeypatch, "train", recipe, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "not a loracli run directory" in err and "mine" in err
    assert _tree(folder) == before


def test_overwrite_refuses_the_working_directory_and_its_ancestors(tmp_path, imagefolder, monkeypatch, capsys):
    project = tmp_path / "project"
    _user_folder(project)
    monkeypatch.chdir(project)
    for target in (project, tmp_path):  # output_dir ".", and ".." (what name: ".." used to resolve to)
        # make it look like a run so that only the working-directory rule can stop it
        (target / rd.RECIPE_FILE).write_text("name: x\n")
        (target / rd.ENV_FILE).write_text("{}\n")
        recipe = write_recipe(tmp_path / "r.yaml", imagefolder, target)
        assert loracli(monkeypatch, "train", recipe, "--overwrite") == 2
        err = capsys.readouterr().err
        assert "refusing to replace" in err and "working directory" in err
    assert (project / "thesis.tex").read_text() == "years of work" and imagefolder.is_dir()


def test_overwrite_refuses_a_run_that_holds_the_data_or_the_recipe(tmp_path, imagefolder, monkeypatch, capsys):
    run = run_training(write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run"))
    data = run / "data"
    os.rename(imagefolder, data)
    recipe = write_recipe(tmp_path / "r2.yaml", data, run)
    assert loracli(monkeypatch, "train", recipe, "--overwrite") == 2
    assert "refusing to replace" in capsys.readouterr().err and (data / "train").is_dir()

    from tests.helpers import make_imagefolder

    inner = write_recipe(run / "again.yaml", make_imagefolder(tmp_path / "images2"), run)  # the recipe lives in the run
    assert loracli(monkeypatch, "train", inner, "--overwrite") == 2
    assert "refusing to replace" in capsys.readouterr().err and (run / "again.yaml").is_file()


def test_overwrite_replaces_a_run(tmp_path, imagefolder):
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run")
    run = run_training(recipe)
    (run / "stale.txt").write_text("from the first run")
    run_training(recipe, overwrite=True)
    assert not (run / "stale.txt").exists() and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert rd.read_status(run)["state"] == "completed"


def test_resume_and_overwrite_together_are_refused(tmp_path, imagefolder):
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run")
    with pytest.raises(UserInputError, match="pass only one of them"):
        run_training(recipe, resume=True, overwrite=True)


# ---------------------------------------------------------------------- merge
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from tests.helpers import make_imagefolder

    root = tmp_path_factory.mktemp("merge")
    images = make_imagefolder(root / "images")
    return run_training(write_recipe(root / "r.yaml", images, root / "runs" / "tiny"))


@pytest.mark.parametrize("target", ["run", "runs", "root", "adapter", "checkpoints", "cwd"])
def test_merge_never_writes_over_a_run(finished_run, target, tmp_path, monkeypatch, capsys):
    run = finished_run
    monkeypatch.chdir(tmp_path)
    out = {"run": run, "runs": run.parent, "root": run.parent.parent, "adapter": run / "adapter",
           "checkpoints": run / "checkpoints", "cwd": tmp_path}[target]
    before = _tree(run)
    assert loracli(monkeypatch, "merge", run, "--out", out, "--force", "--n", "2") == 2
    err = capsys.readouterr().err
    assert "--out" in err and ("run" in err or "working directory" in err), err
    assert _tree(run) == before


def test_merge_into_a_new_folder_inside_the_run_is_allowed(finished_run, monkeypatch, capsys, tmp_path):
    out = finished_run / "merged-test"
    try:
        assert loracli(monkeypatch, "merge", finished_run, "--out", out, "--n", "2") == 0
        assert (out / "config.json").is_file() and (finished_run / "adapter").is_dir()
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


# ----------------------------------------------------------------------- lock
HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from lora_cli.rundir import RunLock
    lock = RunLock(Path(sys.argv[1])).acquire()  # kept: the lock lives as long as its file handle
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_a_second_process_is_refused_and_a_crashed_holder_leaves_no_block(tmp_path, imagefolder, monkeypatch, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "locked"
        recipe = write_recipe(tmp_path / "r.yaml", imagefolder, run)
        for flags in ((), ("--overwrite",)):
            assert loracli(monkeypatch, "train", recipe, *flags) == 2
            err = capsys.readouterr().err
            assert "in use by another loracli process" in err and f"pid {holder.pid}" in err
        assert [p.name for p in run.iterdir()] == [rd.LOCK_FILE]
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the kernel releases the lock
        holder.wait()
    assert rd.RunLock(run).holder() is None
    assert loracli(monkeypatch, "train", recipe) == 0
    assert rd.read_status(run)["state"] == "completed"


def test_the_lock_is_held_while_training(tmp_path, imagefolder):
    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(rd.RunLock(tmp_path / "run").holder())

    run_training(write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run"), extra_callbacks=[Probe()])
    assert seen and all(h is not None and f"pid {os.getpid()}" in h for h in seen)
    assert rd.RunLock(tmp_path / "run").holder() is None  # released at the end


# ---------------------------------------------------------------- checkpoints
def _fail_saving_at(monkeypatch, step: int) -> None:
    original = AdapterTrainer._save_rng_state

    def save_rng_state(self, output_dir):
        if self.state.global_step == step:
            Path(output_dir, "rng_state.pth").write_bytes(b"PK\x03\x04half")  # a partly written file
            raise OSError(28, "No space left on device")
        return original(self, output_dir)

    monkeypatch.setattr(AdapterTrainer, "_save_rng_state", save_rng_state)


def test_a_full_disk_mid_checkpoint_leaves_only_complete_checkpoints(tmp_path, imagefolder, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run", training=CHECKPOINTING)
    with monkeypatch.context() as patch:
        _fail_saving_at(patch, 4)
        with pytest.raises(LoraCliError, match="could not write checkpoint checkpoint-4 .*No space left"):
            run_training(recipe)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2"]
    status = rd.read_status(run)
    assert status["state"] == "failed" and "No space left" in status["error"]
    with pytest.raises(UserInputError, match="stopped before it finished; continue it .* with --resume"):
        run_training(recipe)
    run_training(recipe, resume=True)
    assert rd.read_status(run)["resumed_from"] == "checkpoint-2"
    assert json.loads((run / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_resume_skips_a_truncated_newest_checkpoint_and_says_so(tmp_path, imagefolder):
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run", training=CHECKPOINTING)
    run = run_training(recipe, extra_callbacks=[StopAt(4)])
    optimizer = run / "checkpoints" / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    with pytest.warns(UserWarning, match=r"skipped incomplete checkpoint\(s\) checkpoint-4 \(optimizer.pt is "
                                         r"truncated or corrupt.*resuming from checkpoint-2"):
        run_training(recipe, resume=True)
    assert rd.read_status(run)["resumed_from"] == "checkpoint-2"


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "the payload ran"))


def test_a_pickled_rng_state_is_refused_without_running_it(tmp_path, imagefolder, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run", training=CHECKPOINTING)
    run = run_training(recipe, extra_callbacks=[StopAt(2)])
    marker = tmp_path / "pwned"
    with (run / "checkpoints" / "checkpoint-2" / "rng_state.pth").open("wb") as handle:
        pickle.dump({"python": _Payload(str(marker))}, handle)
    assert loracli(monkeypatch, "train", recipe, "--resume") == 2
    err = capsys.readouterr().err
    assert "rng_state.pth holds pickled objects" in err and "can run code" in err
    assert "weights_only=False" not in err
    assert not marker.exists()


def test_a_run_that_failed_before_its_first_checkpoint_is_started_again(tmp_path, imagefolder, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run")

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(recipe, extra_callbacks=[Boom()])
    run = tmp_path / "run"
    assert rd.read_status(run)["state"] == "failed" and (run / rd.RECIPE_FILE).is_file()
    with pytest.warns(UserWarning, match="failed before its first checkpoint; starting it again"):
        run_training(recipe)
    assert rd.read_status(run)["state"] == "completed"


def test_staged_checkpoints_are_renamed_into_place(tmp_path, imagefolder):
    names = []

    class Watch(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            names.append(sorted(p.name for p in Path(args.output_dir).iterdir()))

    run = run_training(write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run", training=CHECKPOINTING),
                       extra_callbacks=[Watch()])
    assert names[-1] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not (run / "checkpoints" / rd.STAGING_DIR).exists()
    for folder in rd.checkpoints(run):
        assert rd.checkpoint_problem(folder) is None


# ------------------------------------------------- runs that cannot be rebuilt
def test_a_run_without_its_random_base_or_label_map_refuses(finished_run, tmp_path, monkeypatch, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    from tests.inference.images_fixture import make_user_images

    photos = tmp_path / "photos"
    make_user_images(photos)
    os.rename(copy / "base_model", tmp_path / "moved")
    assert loracli(monkeypatch, "predict", photos, "--run", copy) == 2
    assert "base_model/ is missing" in capsys.readouterr().err
    os.rename(tmp_path / "moved", copy / "base_model")
    (copy / "adapter" / "label_map.json").unlink()
    assert loracli(monkeypatch, "eval", copy) == 2
    assert "label_map.json is missing" in capsys.readouterr().err
    (copy / "adapter" / "label_map.json").write_text("{not json")
    assert loracli(monkeypatch, "predict", photos, "--run", copy) == 2
    assert "is not a valid label map" in capsys.readouterr().err


def test_lock_file_alone_counts_as_empty(tmp_path, imagefolder):
    run = tmp_path / "run"
    run.mkdir()
    (run / rd.LOCK_FILE).write_text("pid 1 on gone since long ago\n")  # left by a crash
    run_training(write_recipe(tmp_path / "r.yaml", imagefolder, run))
    assert rd.read_status(run)["state"] == "completed"


def test_output_dir_inside_the_data_is_refused(tmp_path, imagefolder, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, imagefolder / "train" / "run")
    before = _tree(imagefolder)
    assert loracli(monkeypatch, "train", recipe) == 2  # it would have become a class folder
    assert "lies inside" in capsys.readouterr().err and _tree(imagefolder) == before


def test_eval_waits_for_a_run_being_trained(finished_run, monkeypatch, capsys):
    with rd.RunLock(finished_run):
        assert loracli(monkeypatch, "eval", finished_run) == 2
        assert "is being trained right now" in capsys.readouterr().err
    assert loracli(monkeypatch, "eval", finished_run) == 0


def test_a_full_disk_writing_the_results_is_a_failure_with_a_message(tmp_path, imagefolder, monkeypatch, capsys):
    from lora_cli.adapters import AdapterModel

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run")
    monkeypatch.setattr(AdapterModel, "save_pretrained", full)
    assert loracli(monkeypatch, "train", recipe) == 1
    err = capsys.readouterr().err
    assert "could not write the run in" in err and "No space left" in err and "internal error" not in err
    assert rd.read_status(tmp_path / "run")["state"] == "failed"
