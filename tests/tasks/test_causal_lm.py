"""causal-lm: tokenization and prompt masking, then train -> eval -> reload -> merge -> PEFT -> generate."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from lora_cli.adapters import get_adapter_model
from lora_cli.errors import UserInputError
from lora_cli.hf_names import default_target_modules
from lora_cli.inference.loading import load_run
from lora_cli.recipe import RecipeError, load_recipe, resolve_adapter_config
from lora_cli.tasks import causal_lm
from lora_cli.training.pipeline import run_training
from tests.helpers_text import (
    TINY_CONFIGS,
    assert_merge_and_peft_agree,
    eval_batch,
    make_tokenizer,
    prompt_rows,
    require_method,
    write_csv,
    write_jsonl,
    write_recipe,
)

PC = {"prompt_column": "prompt", "completion_column": "completion"}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


def _recipe(tmp_path, tok_dir, model_type="gpt2", method="lora", data=None, adapter=None, training=None):
    write_jsonl(tmp_path / "train.jsonl", prompt_rows())
    data = {"train_file": str(tmp_path / "train.jsonl"), "max_length": 32, **(data or {})}
    return write_recipe(tmp_path / "recipe.yaml", task="causal-lm",
                        model={"config": TINY_CONFIGS[model_type], "tokenizer": str(tok_dir)},
                        data=data, method=method, adapter=adapter, training=training)


# ------------------------------------------------------------------ data
def test_completion_only_collate_masks_exactly_prompt_and_padding(tmp_path, tok_dir):
    recipe = load_recipe(_recipe(tmp_path, tok_dir, data={**PC, "completion_only_loss": True}))
    tok = causal_lm.load_processor(recipe.model)
    rows = [{"prompt": "the film was", "completion": " good"},
            {"prompt": "the day", "completion": " very nice and fine"}]
    encoded = [causal_lm.encode(r, tok, recipe.data) for r in rows]
    batch = causal_lm.make_collator(tok, recipe.data)(encoded)
    prompt_lens = [len(tok(r["prompt"])["input_ids"]) for r in rows]
    lengths = [len(e["input_ids"]) for e in encoded]
    assert prompt_lens == [3, 2] and lengths == [5, 7]  # prompt + completion + </s>
    for i, (p, n) in enumerate(zip(prompt_lens, lengths)):
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        assert (labels[:p] == -100).all()
        assert torch.equal(labels[p:n], ids[p:n])
        assert (labels[n:] == -100).all()
        assert (batch["attention_mask"][i, :n] == 1).all() and (batch["attention_mask"][i, n:] == 0).all()
        assert (ids[n:] == tok.pad_token_id).all()
    assert ids[n - 1] == tok.eos_token_id
    assert int((batch["labels"] != -100).sum()) == sum(n - p for p, n in zip(prompt_lens, lengths))


def test_full_loss_keeps_prompt_labels_and_eos_even_when_pad_is_eos(tmp_path, tok_dir):
    recipe = load_recipe(_recipe(tmp_path, tok_dir, data=PC))
    tok = causal_lm.load_processor(recipe.model)
    tok.pad_token = tok.eos_token  # GPT-2 style: padding with the EOS token
    enc = [causal_lm.encode({"prompt": "the day", "completion": " good"}, tok, recipe.data),
           causal_lm.encode({"prompt": "the film was very", "completion": " good"}, tok, recipe.data)]
    batch = causal_lm.make_collator(tok, recipe.data)(enc)
    assert batch["labels"][0].tolist() == enc[0]["input_ids"] + [-100, -100]
    assert batch["labels"][0, 3] == tok.eos_token_id


def test_text_column_truncates_to_max_length(tmp_path, tok_dir):
    write_csv(tmp_path / "t.csv", [{"text": " ".join(["good"] * 50)}, {"text": "the day"}])
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", task="causal-lm",
                                      model={"config": TINY_CONFIGS["gpt2"], "tokenizer": str(tok_dir)},
                                      data={"train_file": str(tmp_path / "t.csv"), "max_length": 8}))
    tok = causal_lm.load_processor(recipe.model)
    long = causal_lm.encode({"text": "good " * 50}, tok, recipe.data)
    short = causal_lm.encode({"text": "the day"}, tok, recipe.data)
    assert len(long["input_ids"]) == 8 and long["labels"] == long["input_ids"]
    assert short["input_ids"][-1] == tok.eos_token_id and len(short["input_ids"]) == 3


@pytest.mark.parametrize("data, match", [
    ({"prompt_column": "prompt"}, r"recipe\.yaml:\d+: data\.prompt_column: needs data\.completion_column too: .*go together"),
    ({"completion_only_loss": True}, r"recipe\.yaml:\d+: data\.completion_only_loss: needs prompt/completion data"),
])
def test_bad_data_sections_are_recipe_errors(tmp_path, tok_dir, data, match):
    """Column rules are checked when the recipe loads, at the recipe's line, before any data."""
    with pytest.raises(RecipeError, match=match):
        load_recipe(_recipe(tmp_path, tok_dir, data=data))


def test_a_missing_text_column_fails_clearly(tmp_path, tok_dir):
    recipe = load_recipe(_recipe(tmp_path, tok_dir, data={"text_column": "body"}))
    with pytest.raises(UserInputError, match="no column 'body'"):
        causal_lm.load_raw(recipe.data, recipe.seed)


def _adapt(recipe):
    model = causal_lm.build_model(recipe.model)
    config = resolve_adapter_config(recipe.adapter, total_step=None, targets=default_target_modules(model))
    return get_adapter_model(model, config)


def test_fan_in_fan_out_warns_only_without_conv1d(tmp_path, tok_dir):
    """The engine, which knows whether it adapted a GPT-2 Conv1D, warns about a needless fan_in_fan_out."""
    opt = load_recipe(_recipe(tmp_path, tok_dir, "opt", adapter={"fan_in_fan_out": True}))
    with pytest.warns(UserWarning, match="fan_in_fan_out.*ignored"):
        _adapt(opt)
    gpt2 = load_recipe(_recipe(tmp_path, tok_dir, "gpt2", adapter={"fan_in_fan_out": True}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _adapt(gpt2).get_base_model()
    assert model.config.vocab_size == len(causal_lm.load_processor(gpt2.model))
    assert model.config.pad_token_id == causal_lm.load_processor(gpt2.model).pad_token_id


# ----------------------------------------------------------- end to end
@pytest.mark.parametrize("model_type, method, target", [
    ("gpt2", "lora", ["c_attn", "c_proj"]),
    ("opt", "loha", ["q_proj", "v_proj"]),
])
def test_train_eval_merge_peft_generate(tmp_path, tok_dir, model_type, method, target):
    from transformers import AutoModelForCausalLM

    require_method(method)
    adapter = {"target_modules": target}
    if model_type == "gpt2":
        adapter["fan_in_fan_out"] = True
    run_dir = run_training(_recipe(tmp_path, tok_dir, model_type, method, data={**PC, "completion_only_loss": True},
                                   adapter=adapter, training={"learning_rate": 3e-2}))
    metrics = json.loads((run_dir / "eval.json").read_text())
    # One eval batch: the Trainer's mean loss is the per-token mean the perplexity uses.
    assert math.isclose(metrics["eval_perplexity"], math.exp(metrics["eval_loss"]), rel_tol=1e-4)

    run = load_run(run_dir, device="cpu")
    cfg = run.model.peft_config["default"]
    assert cfg.task_type == "CAUSAL_LM" and not cfg.modules_to_save
    batch = eval_batch(run)
    assert_merge_and_peft_agree(run, AutoModelForCausalLM, batch)

    text = causal_lm.generate(run, "the film was", max_new_tokens=4)
    assert isinstance(text, str) and text == causal_lm.generate(load_run(run_dir), "the film was", max_new_tokens=4)
    many = causal_lm.generate(run, ["the film was", "the day"], max_new_tokens=3, temperature=0.7, top_p=0.9)
    assert len(many) == 2 and all(isinstance(t, str) for t in many)
    with pytest.raises(UserInputError, match="--top-p 1.5"):
        causal_lm.generate(run, "the", top_p=1.5)


@pytest.mark.slow
def test_training_learns_the_completions(tmp_path, tok_dir):
    run_dir = run_training(_recipe(tmp_path, tok_dir, "gpt2", data={**PC, "completion_only_loss": True},
                                   adapter={"target_modules": "all-linear", "r": 8},
                                   training={"max_steps": 60, "learning_rate": 2e-2, "logging_steps": 20}))
    run = load_run(run_dir, device="cpu")
    assert causal_lm.generate(run, "the film was", max_new_tokens=3).split() == ["good", "and", "great"]
