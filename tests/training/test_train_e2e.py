"""`loracli train` end to end, once per method: the run directory is complete and its
adapter loads in PEFT with the same logits as loracli's own `load_run`."""

from __future__ import annotations

import json

import pytest
import torch

from lora_cli import rundir as rd
from lora_cli.inference.loading import load_run
from lora_cli.recipe import load_recipe
from tests.training._util import METHOD_OPTIONS, METHODS, loracli, write_recipe

STEPS = 6

RUN_FILES = (
    "recipe.yaml",
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "adapter/label_map.json",
    "processor/preprocessor_config.json",
    "base_model/config.json",
    "base_model/model.safetensors",
    f"checkpoints/checkpoint-{STEPS}/adapter_state.safetensors",
    f"checkpoints/checkpoint-{STEPS}/adapter_model.safetensors",
    f"checkpoints/checkpoint-{STEPS}/optimizer.pt",
    "metrics.jsonl",
    "eval.json",
    "plots/loss.png",
    "env.json",
)


@pytest.fixture(params=METHODS)
def trained(request, tmp_path, imagefolder, monkeypatch):
    method = request.param
    recipe = write_recipe(
        tmp_path / "recipe.yaml", imagefolder, tmp_path / "run", method,
        training={"max_steps": STEPS, "save_strategy": "steps", "save_steps": STEPS},
    )
    assert loracli(monkeypatch, "train", recipe) == 0
    return method, recipe, tmp_path / "run"


# PEFT warns about every AdaLoRA rank_pattern key (its own saved ones too): they name lora_E
# parameters, not modules; it applies them all the same.
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")
def test_train_writes_a_complete_run_that_peft_loads(trained):
    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    method, recipe_file, run = trained
    missing = [name for name in RUN_FILES if not (run / name).is_file()]
    assert not missing, f"run directory lacks {missing}"

    assert load_recipe(run / "recipe.yaml") == load_recipe(recipe_file)
    env = json.loads((run / "env.json").read_text())
    assert env["seed"] == 0
    assert all(env[key] for key in ("python", "torch", "transformers", "loracli"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows if "loss" in row)
    assert 0.0 <= json.loads((run / "eval.json").read_text())["accuracy"] <= 1.0
    assert rd.read_label_map(run / "adapter") == {0: "beignets", 1: "churros", 2: "macarons"}

    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ours = load_run(run, device="cpu").model
    base = AutoModelForImageClassification.from_pretrained(run / "base_model").eval()
    with torch.no_grad():
        base_logits = base(pixel_values=pixels).logits
        peft_model = PeftModel.from_pretrained(base, run / "adapter").eval()
        peft_logits = peft_model(pixel_values=pixels).logits
        our_logits = ours(pixel_values=pixels).logits
    torch.testing.assert_close(peft_logits, our_logits, atol=1e-5, rtol=0)
    assert (our_logits - base_logits).abs().max() > 1e-3, "training changed nothing"

    if method == "adalora":
        config = json.loads((run / "adapter" / "adapter_config.json").read_text())
        pattern = config["rank_pattern"]
        adapted = [path for path, _ in ours.adapter_layers()]
        assert len(pattern) == len(adapted) == 4  # query and value of 2 layers
        assert all(len(mask) == METHOD_OPTIONS["adalora"]["init_r"] for mask in pattern.values())
        assert sum(sum(mask) for mask in pattern.values()) == METHOD_OPTIONS["adalora"]["target_r"] * len(adapted)


def test_overwrite_replaces_an_existing_run(tmp_path, imagefolder, monkeypatch):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", imagefolder, run, training={"max_steps": 1})
    assert loracli(monkeypatch, "train", recipe) == 0  # only a run may be replaced (issue 11)
    (run / "stale.txt").write_text("earlier work")
    assert loracli(monkeypatch, "train", recipe, "--overwrite") == 0
    assert not (run / "stale.txt").exists()
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "eval.json").is_file()


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match")
def test_adalora_schedule_from_fractional_epochs_reaches_the_final_phase(tmp_path, imagefolder, monkeypatch):
    """total_step derived as the Trainer counts: 24 images, batch 8, 1.5 epochs = 5 steps
    (not 6), so the final phase (the last tfinal steps) really runs and keeps target_r."""
    options = METHOD_OPTIONS["adalora"]
    recipe = write_recipe(
        tmp_path / "recipe.yaml", imagefolder, tmp_path / "run", "adalora",
        adapter={"tinit": 1, "tfinal": 1},
        training={"max_steps": -1, "num_train_epochs": 1.5, "per_device_train_batch_size": 8},
    )
    assert loracli(monkeypatch, "train", recipe) == 0
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["total_step"] == 5
    assert sum(sum(mask) for mask in config["rank_pattern"].values()) == options["target_r"] * 4


def test_the_run_report_is_the_final_evaluation_pass_and_equals_loracli_eval(tmp_path, imagefolder, monkeypatch):
    """eval.json comes from the logits of the Trainer's final evaluation (one pass over the eval split,
    not a second forward pass of its own) and is the report `loracli eval` writes for the run."""
    from lora_cli.inference.evaluate import eval_run
    from lora_cli.training import pipeline

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the run's report ran its own pass over the eval split")

    monkeypatch.setattr(pipeline, "evaluate", no_second_pass)
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", imagefolder, run, training={"max_steps": STEPS})
    assert loracli(monkeypatch, "train", recipe) == 0
    written = json.loads((run / "eval.json").read_text())
    assert written["accuracy"] == written["trainer"]["eval_accuracy"]
    assert written["num_samples"] == len(written["predictions"]) > 0
    monkeypatch.undo()

    again, _ = eval_run(run, write=False)
    assert [p["predicted"] for p in written["predictions"]] == [p["predicted"] for p in again["predictions"]]
    assert [p["label"] for p in written["predictions"]] == [p["label"] for p in again["predictions"]]
    assert written["accuracy"] == again["accuracy"]
    assert written["loss"] == pytest.approx(again["loss"], rel=1e-5)
    confidences = [p["confidence"] for p in written["predictions"]]
    assert confidences == pytest.approx([p["confidence"] for p in again["predictions"]], abs=1e-5)
    assert written["trainer"]["eval_loss"] == pytest.approx(written["loss"], rel=1e-5)


def test_the_run_report_falls_back_to_its_own_pass_when_the_trainer_keeps_no_logits(tmp_path, imagefolder,
                                                                                    monkeypatch):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", imagefolder, run,
                          training={"max_steps": 2, "prediction_loss_only": True})
    assert loracli(monkeypatch, "train", recipe) == 0
    written = json.loads((run / "eval.json").read_text())
    assert "eval_accuracy" not in written["trainer"] and "eval_loss" in written["trainer"]
    assert written["num_samples"] == len(written["predictions"]) > 0
    assert written["loss"] == pytest.approx(written["trainer"]["eval_loss"], rel=1e-5)
