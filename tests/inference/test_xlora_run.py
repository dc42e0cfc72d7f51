"""X-LoRA from a recipe: two tiny LoRA expert runs, then an X-LoRA run composing them,
through train, eval, predict (with --scalings) and merge (refused), and PEFT loading the run."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainerCallback

from lora_cli.inference.loading import load_run
from lora_cli.recipe import RecipeError, load_recipe
from lora_cli.training.pipeline import run_training
from tests.helpers_text import (
    TINY_CONFIGS,
    cli,
    logits_of,
    make_tokenizer,
    prompt_rows,
    write_jsonl,
)

TRAINING = {"max_steps": 3, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16,
            "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no", "use_cpu": True}


def _recipe(folder: Path, tok: Path, data: Path, adapter: dict, lr: float = 5e-3) -> Path:
    recipe = {
        "name": folder.name, "task": "causal-lm", "output_dir": str(folder / "run"), "seed": 0,
        "model": {"config": TINY_CONFIGS["opt"], "tokenizer": str(tok)},
        "data": {"train_file": str(data), "max_length": 32},
        "adapter": adapter,
        "training": {**TRAINING, "learning_rate": lr},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return folder / "recipe.yaml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("xlora-runs")
    tok = make_tokenizer(root / "tok")
    data = write_jsonl(root / "train.jsonl", prompt_rows())
    lora = {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    experts = {name: run_training(_recipe(root / name, tok, data, lora, lr)) for name, lr in (("a", 5e-2), ("b", 1e-2))}
    xlora = {"method": "xlora", "adapters": {n: str(p) for n, p in experts.items()}, "xlora_depth": 2,
             "xlora_size": 8, "xlora_dropout_p": 0.0}
    recipe = _recipe(root / "mix", tok, data, xlora, lr=5e-2)
    return {"root": root, "tok": tok, "data": data, "experts": experts, "recipe": recipe, "mix": run_training(recipe)}


def test_training_moves_only_the_gating_head_and_saves_peft_layout(runs):
    adapter = runs["mix"] / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "XLORA" and config["task_type"] == "CAUSAL_LM" and list(config["adapters"]) == ["0", "1"]
    for name, expert_run in runs["experts"].items():  # the experts are copied unchanged
        from safetensors.torch import load_file

        mine, theirs = load_file(adapter / name / "adapter_model.safetensors"), load_file(
            expert_run / "adapter" / "adapter_model.safetensors")
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    run = load_run(runs["mix"], device="cpu")
    assert run.model.expert_names == ["a", "b"] and run.model.internal_xlora_classifier.layers[0].weight.shape == (8, 32)
    assert [n for n, p in run.model.named_parameters() if "lora_" in n and p.requires_grad] == []
    steps = [json.loads(line) for line in (runs["mix"] / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    assert len(steps) == 3 and all(s["grad_norm"] > 0 for s in steps)  # the head gets gradients (experts frozen)
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_eval_and_peft_give_the_runs_logits(monkeypatch, capsys, runs):
    import peft
    from transformers import AutoModelForCausalLM

    code, out, err = cli(monkeypatch, capsys, "eval", str(runs["mix"]), "--json")
    assert code == 0, err
    assert json.loads(out)["loss"] > 0
    run = load_run(runs["mix"], device="cpu")
    batch = {"input_ids": torch.randint(5, 30, (2, 6), generator=torch.Generator().manual_seed(0))}
    ours = logits_of(run.model, batch)
    with run.model.disable_adapter():
        assert not torch.allclose(logits_of(run.model, batch), ours, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(runs["mix"] / "base_model")
    base.config.use_cache = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base, runs["mix"] / "adapter").eval()
    torch.testing.assert_close(logits_of(theirs, batch), ours, atol=1e-5, rtol=1e-4)


def test_predict_reports_expert_scalings(monkeypatch, capsys, runs):
    code, out, err = cli(monkeypatch, capsys, "predict", "--run", str(runs["mix"]), "--prompt", "the film was",
                         "--max-new-tokens", "2", "--scalings", "--json")
    assert code == 0, err
    row = json.loads(out)[0]
    assert row["text"] == "the film was" and isinstance(row["generated"], str)
    scalings = row["scalings"]
    assert scalings["experts"] == ["a", "b"] and scalings["tokens"] == ["the", "film", "was"]
    assert len(scalings["per_token"]) == 3 and all(sum(w) == pytest.approx(1.0, abs=1e-5) for w in scalings["per_token"])
    assert sum(scalings["mean"].values()) == pytest.approx(1.0, abs=1e-5)

    code, out, err = cli(monkeypatch, capsys, "predict", "--run", str(runs["mix"]), "--prompt", "the film\x1b[31m was",
                         "--max-new-tokens", "1", "--scalings")
    assert code == 0, err
    assert "expert" in out and "mean" in out and "\x1b[31m" not in out

    code, _, err = cli(monkeypatch, capsys, "predict", "--run", str(runs["experts"]["a"]), "--prompt", "the film",
                       "--scalings")
    assert code == 2 and "--scalings is for X-LoRA runs" in err


def test_merge_is_refused_with_what_to_do(monkeypatch, capsys, runs, tmp_path):
    code, _, err = cli(monkeypatch, capsys, "merge", str(runs["mix"]), "--out", str(tmp_path / "merged"))
    assert code == 2
    assert "cannot be merged" in err and "loracli merge <expert run>" in err
    assert not (tmp_path / "merged").exists()


def test_bad_experts_in_a_recipe_name_the_line(runs, tmp_path):
    from lora_cli.adapters import LoHaConfig, get_adapter_model
    from tests.helpers import tiny_opt

    (tmp_path / "empty").mkdir()
    get_adapter_model(tiny_opt(), LoHaConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "loha")
    adapter = {"method": "xlora", "adapters": {"a": str(runs["experts"]["a"]), "gone": str(tmp_path / "nope"),
                                               "empty": str(tmp_path / "empty"), "h": str(tmp_path / "loha")}}
    recipe = _recipe(tmp_path / "bad", runs["tok"], runs["data"], adapter)
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    text = str(info.value)
    assert re.search(r"recipe\.yaml:\d+: adapter\.adapters\.gone: does not exist", text), text
    assert re.search(r"recipe\.yaml:\d+: adapter\.adapters\.empty: is not an adapter folder nor a loracli run", text)
    assert re.search(r"recipe\.yaml:\d+: adapter\.adapters\.h: is a loha adapter .*X-LoRA mixes LoRA experts only", text)


def test_experts_of_another_random_base_are_refused_before_anything_is_written(runs, tmp_path):
    from lora_cli.errors import UserInputError

    adapter = {"method": "xlora", "adapters": {n: str(p) for n, p in runs["experts"].items()}}
    recipe = _recipe(tmp_path / "other", runs["tok"], runs["data"], adapter)
    with pytest.raises(UserInputError, match=r"expert 'a' .*another base model.*model\.name_or_path to .*base_model"):
        run_training(recipe, ["seed=1"])  # seed 1 builds other random base weights than the experts' seed 0
    assert not (tmp_path / "other" / "run").exists()


class _StopAfterCheckpoint(TrainerCallback):
    """Stops training right after the first checkpoint is written (an interrupted run)."""

    def on_save(self, args, state, control, **kwargs):
        control.should_training_stop = True


@pytest.mark.slow
def test_resume_ends_where_an_uninterrupted_run_ends(runs, tmp_path):
    """Head and trainable experts come back from the checkpoint (dropout in the head included)."""
    from safetensors.torch import load_file

    adapter = {"method": "xlora", "adapters": {n: str(p) for n, p in runs["experts"].items()}, "xlora_depth": 2,
               "xlora_size": 8, "xlora_dropout_p": 0.1, "use_trainable_adapters": True}
    training = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}

    def recipe(name):
        path = _recipe(tmp_path / name, runs["tok"], runs["data"], adapter, lr=5e-2)
        text = yaml.safe_load(path.read_text())
        text["training"].update(training)
        path.write_text(yaml.safe_dump(text, sort_keys=False))
        return path

    def files(run):
        return {f"{sub}/{k}": v for sub in ("", "a/", "b/")
                for k, v in load_file(run / "adapter" / sub / "adapter_model.safetensors").items()}

    straight = run_training(recipe("straight"))
    stopped_recipe = recipe("stopped")
    stopped = run_training(stopped_recipe, extra_callbacks=[_StopAfterCheckpoint()])
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["checkpoint-2"]
    first = files(stopped)
    resumed = run_training(stopped_recipe, resume=True)
    expected, got = files(straight), files(resumed)
    assert expected.keys() == got.keys() and any(k.startswith("a/") for k in expected)
    assert max((first[k] - expected[k]).abs().max().item() for k in expected) > 1e-4
    for key in expected:
        assert (got[key] - expected[key]).abs().max().item() <= 1e-6, key


def test_dry_run_lists_the_experts_layers_and_the_head_parameters(runs, tmp_path, capsys):
    assert run_training(runs["recipe"], [f"output_dir={tmp_path / 'dry'}"], dry_run=True) is None
    err = capsys.readouterr().err
    assert "adapted modules (xlora)" in err and err.count("a: r=4") == 4 and err.count("b: r=4") == 4
    assert "trainable params: 282 " in err  # the head only: (32 * 8 + 8) + (8 * 2 + 2)
    assert not (tmp_path / "dry").exists()


def test_scalings_of_a_prompt_longer_than_the_context_cover_its_end(monkeypatch, capsys, runs):
    """Before: IndexError (160 tokens through 64 positions). The scalings read the prompt's last 64 tokens,
    the generation its last 62 (beside 2 new tokens), with a note."""
    prompt = " ".join(["the film was good"] * 40)
    code, out, err = cli(monkeypatch, capsys, "predict", "--run", str(runs["mix"]), "--prompt", prompt,
                         "--max-new-tokens", "2", "--scalings", "--json")
    assert code == 0, err
    assert "--prompt 1 has 160 tokens" in err and "its first 98 were left out" in err
    assert json.loads(out)[0]["scalings"]["tokens"][-4:] == ["the", "film", "was", "good"]
    assert len(json.loads(out)[0]["scalings"]["tokens"]) == 64


def test_the_pushed_card_names_the_method_x_lora(runs, tmp_path):
    """The card's prose takes the method's display name from its config class (was "A xlora adapter")."""
    from huggingface_hub import ModelCard

    from lora_cli.inference.push import push_run

    push_run(runs["mix"], "me/mix-xlora", dry_run=tmp_path / "to-push")
    card = ModelCard.load(tmp_path / "to-push" / "README.md")
    assert "An X-LoRA adapter for causal-lm" in card.text and "xlora adapter" not in card.text
    assert card.data.to_dict()["loracli"]["method"] == "xlora"
