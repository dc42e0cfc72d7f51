"""--resume: a run stopped after a checkpoint and resumed ends with the same adapter as a
run that was never stopped (same seed, CPU), dropout and augmentation included."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from lora_cli.training.pipeline import run_training
from tests.training._util import write_recipe

STEPS, STOP_AT = 6, 2


class StopAfterCheckpoint(TrainerCallback):
    """Stops training right after the first checkpoint is written (an interrupted run)."""

    def on_save(self, args, state, control, **kwargs):
        control.should_training_stop = True


def _adapter(run) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("method", ["lora", "adalora"])  # adalora: rank budgeting across the stop
def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, imagefolder, method):
    sections = dict(
        adapter={"lora_dropout": 0.1},
        data={"augment": True},  # random crops and flips draw from the RNG the checkpoint restores
        training={"max_steps": STEPS, "per_device_train_batch_size": 8,  # 3 steps an epoch: 2 epochs
                  "save_strategy": "steps", "save_steps": STOP_AT, "warmup_steps": 1},
    )
    straight = run_training(write_recipe(tmp_path / "a.yaml", imagefolder, tmp_path / "a", method, **sections))

    recipe = write_recipe(tmp_path / "b.yaml", imagefolder, tmp_path / "b", method, **sections)
    stopped = run_training(recipe, extra_callbacks=[StopAfterCheckpoint()])
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == [f"checkpoint-{STOP_AT}"]
    first = _adapter(stopped)
    resumed = run_training(recipe, resume=True)

    expected, got = _adapter(straight), _adapter(resumed)
    assert expected.keys() == got.keys()
    assert max((first[k] - expected[k]).abs().max().item() for k in first if first[k].shape == expected[k].shape) > 1e-4
    for key in expected:
        diff = (got[key] - expected[key]).abs().max().item()
        assert diff <= 1e-6, f"{key}: resumed differs from uninterrupted by {diff}"


def test_training_augmentation_depends_on_seed_epoch_and_row_only(imagefolder):
    """Crops come from (seed, epoch, row), not from the global RNG: a resumed run sees the
    crops the uninterrupted run saw, and each epoch sees new ones."""
    from lora_cli.recipe import load_recipe
    from lora_cli.tasks import image_classification as ic

    recipe = load_recipe(write_recipe(imagefolder / "r.yaml", imagefolder, imagefolder / "run", data={"augment": True}))
    splits, _ = ic.load_raw(recipe.data, recipe.seed)
    train, _ = ic.prepare(splits, ic.load_processor(recipe.model), recipe.data, recipe.seed)
    first = train[3]["pixel_values"]
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(train[3]["pixel_values"], first)
    assert not torch.equal(train[4]["pixel_values"], first)
    train.set_epoch(1)
    assert not torch.equal(train[3]["pixel_values"], first)
    train.set_epoch(0)
    assert torch.equal(train[3]["pixel_values"], first)


def test_resume_refuses_a_changed_recipe_but_allows_a_longer_run(tmp_path, imagefolder):
    from lora_cli.errors import UserInputError

    training = {"max_steps": 2, "per_device_train_batch_size": 8, "save_strategy": "steps", "save_steps": 2}
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run", "lora", training=training)
    run = run_training(recipe)
    before = _adapter(run)
    with pytest.raises(UserInputError, match=r"adapter\.r: 4 -> 8.*start a new run"):
        run_training(recipe, ["adapter.r=8"], resume=True)
    assert all(torch.equal(before[k], v) for k, v in _adapter(run).items()), "a refused resume changed the run"
    run_training(recipe, ["training.max_steps=3"], resume=True)  # training longer is what --resume is for


def test_resume_of_a_completed_run_is_refused_and_leaves_its_records(tmp_path, imagefolder, monkeypatch, capsys):
    """A finished run has nothing left to train: --resume used to evaluate it again and
    rewrite train.json with zeros (0 optimizer steps, 0 samples/s), which compare then showed."""
    from tests.training._util import loracli

    training = {"max_steps": 2, "per_device_train_batch_size": 8, "save_strategy": "steps", "save_steps": 1}
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run", "lora", training=training)
    run = run_training(recipe)
    records = ("train.json", "eval.json", "metrics.jsonl", "status.json", "adapter/adapter_model.safetensors")
    before = {name: (run / name).read_bytes() for name in records}
    capsys.readouterr()
    assert loracli(monkeypatch, "train", recipe, "--resume") == 2
    err = capsys.readouterr().err
    assert "already completed" in err and "nothing to resume" in err, err
    assert "output_dir=" in err and "--overwrite" in err  # how to train longer
    assert "Traceback" not in err
    assert {name: (run / name).read_bytes() for name in records} == before
