"""The calibration pass of `loracli train` (EVA, CorDA, LoRA-GA) on a tiny ViT recipe:
training data through the task's collator, ranks printed by --dry-run, a record in the
run directory that --resume restores instead of recomputing, adapters PEFT loads."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, TrainerCallback

from lora_cli.adapters import AdapterModel
from lora_cli.devices import model_device
from lora_cli.errors import UserInputError
from lora_cli.inference.loading import load_run
from lora_cli.recipe import load_recipe
from lora_cli.training import calibration
from lora_cli.training.pipeline import run_training
from tests.training._util import loracli, write_recipe

INITS = {
    "eva": {"init_lora_weights": "eva", "eva_config": {"rho": 2.0, "tau": 0.9}, "calibration_batches": 3},
    "corda": {"init_lora_weights": "corda", "corda_config": {"corda_method": "ipm"}, "calibration_batches": 3},
    "lora_ga": {"init_lora_weights": "lora_ga", "calibration_batches": 3},
}


def _recipe(tmp_path, imagefolder, init, name="run", **training):
    sections = {"adapter": INITS[init]}
    if training:
        sections["training"] = training
    return write_recipe(tmp_path / f"{name}.yaml", imagefolder, tmp_path / name, **sections)


def _pixels(n=4):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_train_end_to_end_records_calibration_and_peft_loads_the_adapter(tmp_path, imagefolder, init):
    run = run_training(_recipe(tmp_path, imagefolder, init))
    record = json.loads((run / calibration.CALIBRATION_FILE).read_text())
    assert record["init"] == init and record["batches"] == 3 and record["seed"] == 0 and record["batch_size"] == 4
    assert record["seconds"] >= 0 and set(record["ranks"]) == {
        f"vit.layers.{i}.attention.{m}" for i in range(2) for m in ("q_proj", "v_proj")}
    assert sum(record["ranks"].values()) == 4 * 4  # EVA moves ranks within the budget, CorDA keeps r
    factors = load_file(run / calibration.FACTORS_FILE)
    assert any(t.abs().sum() > 0 for k, t in factors.items() if k.endswith("lora_A"))

    base_dir = run / "base_model"  # the random-init base, saved untouched
    x = _pixels()
    ours = AdapterModel.from_pretrained(AutoModelForImageClassification.from_pretrained(base_dir), run / "adapter")
    theirs = peft.PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(base_dir),
                                            run / "adapter").eval()
    plain = AutoModelForImageClassification.from_pretrained(base_dir).eval()
    with torch.no_grad():
        got, expected = ours(pixel_values=x).logits, theirs(pixel_values=x).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert (got - plain(pixel_values=x).logits).abs().max() > 1e-4  # the adapter trained: not trivially equal
        loaded = load_run(run)  # what eval / merge / predict use
        torch.testing.assert_close(loaded.model(pixel_values=x.to(model_device(loaded.model))).logits.cpu(), expected,
                                   atol=1e-5, rtol=0)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    if init == "eva":
        moved = {k: v for k, v in record["ranks"].items() if v != 4}
        assert config["init_lora_weights"] == "eva"
        assert {k: v for k, v in config["rank_pattern"].items() if v} == {k: v for k, v in moved.items() if v}
    else:  # relative to the original base: rank 2r with the start folded in
        assert config["init_lora_weights"] is True and config["r"] == 8


@pytest.mark.parametrize("init", ["eva", "corda"])
def test_dry_run_prints_the_calibrated_ranks_and_writes_nothing(tmp_path, imagefolder, monkeypatch, capsys, init):
    recipe = _recipe(tmp_path, imagefolder, init)
    assert loracli(monkeypatch, "train", recipe, "--dry-run") == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert f"calibration ({init}): 3 batches of 4, seed 0" in text
    assert "vit.layers.0.attention.q_proj" in text and "rank" in text
    assert not (tmp_path / "run").exists()


class StopAfterCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        control.should_training_stop = True


@pytest.mark.parametrize("init", ["eva", "corda", "lora_ga"])
def test_resume_restores_the_calibration_instead_of_recomputing_it(tmp_path, imagefolder, monkeypatch, init):
    """A resumed run ends exactly where an uninterrupted one does, and the engine never runs again."""
    steps = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    straight = run_training(_recipe(tmp_path, imagefolder, init, "a", **steps))
    recipe = _recipe(tmp_path, imagefolder, init, "b", **steps)
    stopped = run_training(recipe, extra_callbacks=[StopAfterCheckpoint()])
    first = json.loads((stopped / calibration.CALIBRATION_FILE).read_text())

    def never(*args, **kwargs):
        raise AssertionError("the calibration ran again on --resume")

    monkeypatch.setattr("lora_cli.adapters.methods.lora.eva.initialize_eva_weights", never)
    monkeypatch.setattr("lora_cli.adapters.methods.lora.corda.preprocess_corda", never)
    monkeypatch.setattr("lora_cli.adapters.methods.lora.lora_ga.initialize_lora_ga_weights", never)
    resumed = run_training(recipe, resume=True)
    assert json.loads((resumed / calibration.CALIBRATION_FILE).read_text()) == first
    expected = load_file(straight / "adapter" / "adapter_model.safetensors")
    got = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0, msg=key)


def test_calibration_batches_follow_the_seed(imagefolder, tmp_path):
    from lora_cli.tasks import get_task

    recipe = load_recipe(_recipe(tmp_path, imagefolder, "eva"))
    task = get_task(recipe.task)
    processor = task.load_processor(recipe.model)
    splits, _ = task.load_raw(recipe.data, recipe.seed)
    train, _ = task.prepare(splits, processor, recipe.data, recipe.seed)
    collate = task.make_collator(processor, recipe.data)
    one = calibration.calibration_batches(train, collate, 4, 3, seed=0)
    two = calibration.calibration_batches(train, collate, 4, 3, seed=0)
    other = calibration.calibration_batches(train, collate, 4, 3, seed=1)
    assert len(one) == 3 and all(b["pixel_values"].shape[0] == 4 for b in one)
    assert all(torch.equal(a["labels"], b["labels"]) and torch.equal(a["pixel_values"], b["pixel_values"])
               for a, b in zip(one, two, strict=True))
    assert not all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(one, other, strict=True))


@pytest.mark.parametrize("value", [0, -3, "many", True])
def test_bad_calibration_batches_names_the_line(tmp_path, imagefolder, value):
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run",
                          adapter={**INITS["eva"], "calibration_batches": value})
    with pytest.raises(UserInputError, match=r"r\.yaml:\d+.*adapter\.calibration_batches.*integer >= 1"):
        load_recipe(recipe)


def test_calibration_batches_round_trip_through_the_resolved_recipe(tmp_path, imagefolder):
    recipe = load_recipe(_recipe(tmp_path, imagefolder, "corda"))
    assert recipe.adapter.options["calibration_batches"] == 3
    again = tmp_path / "resolved.yaml"
    again.write_text(recipe.to_yaml())
    assert load_recipe(again).adapter.options == recipe.adapter.options


def test_lora_ga_runs_through_the_same_calibration_pass(tmp_path, imagefolder, monkeypatch, capsys):
    """LoRA-GA's engine function gets the calibration batches, with labels, on the model's device."""
    from lora_cli.adapters.methods.lora import lora_ga

    seen = []
    real = lora_ga.initialize_lora_ga_weights

    def spy(model, batches, adapter_name="default"):
        batches = list(batches)
        seen.extend(batches)
        return real(model, batches, adapter_name)

    monkeypatch.setattr(lora_ga, "initialize_lora_ga_weights", spy)
    recipe = write_recipe(tmp_path / "ga.yaml", imagefolder, tmp_path / "ga",
                          adapter={"init_lora_weights": "lora_ga", "calibration_batches": 2})
    assert run_training(recipe, dry_run=True) is None
    assert len(seen) == 2 and all("labels" in b and b["pixel_values"].shape[0] == 4 for b in seen)
    assert "calibration (lora_ga): 2 batches of 4, seed 0" in capsys.readouterr().err


def test_causal_lm_eva_leaves_prompt_and_padding_out(tmp_path, monkeypatch):
    """Text through the task's collator: EVA's SVD sees only completion tokens (labels != -100)."""
    from lora_cli.adapters.methods.lora import eva
    from tests.helpers_text import TINY_CONFIGS, make_tokenizer, prompt_rows, write_jsonl
    from tests.helpers_text import write_recipe as write_text_recipe

    masks = []
    real = eva.token_mask

    def spy(batch, value):
        mask = real(batch, value)
        masks.append((batch, mask))
        return mask

    monkeypatch.setattr(eva, "token_mask", spy)
    tok = make_tokenizer(tmp_path / "tok")
    write_jsonl(tmp_path / "train.jsonl", prompt_rows())
    recipe = write_text_recipe(
        tmp_path / "lm.yaml", task="causal-lm", model={"config": TINY_CONFIGS["gpt2"], "tokenizer": str(tok)},
        data={"train_file": str(tmp_path / "train.jsonl"), "max_length": 32, "prompt_column": "prompt",
              "completion_column": "completion", "completion_only_loss": True},
        adapter={"init_lora_weights": "eva", "eva_config": {"tau": 0.9}, "calibration_batches": 2,
                 "target_modules": ["c_attn", "c_fc"]})
    run = run_training(recipe)
    record = json.loads((run / calibration.CALIBRATION_FILE).read_text())
    assert record["batches"] == 2 and len(record["ranks"]) == 4
    batch, mask = masks[-1]
    assert torch.equal(mask, batch["attention_mask"].bool() & (batch["labels"] != -100))
    assert (batch["attention_mask"].bool() & ~mask).any()  # prompt tokens were left out


def test_calibration_batches_can_be_overridden_on_the_command_line(tmp_path, imagefolder):
    recipe = _recipe(tmp_path, imagefolder, "eva")
    assert load_recipe(recipe, ["adapter.calibration_batches=5"]).adapter.options["calibration_batches"] == 5
    with pytest.raises(UserInputError, match=r"adapter\.calibration_batches.*integer >= 1"):
        load_recipe(recipe, ["adapter.calibration_batches=0"])
