"""Recipes reach trainable tokens (alone and beside LoRA) and target_parameters, and say
file:line when the options do not fit the method."""

from __future__ import annotations

import re

import pytest

from lora_cli.adapters.methods.trainable_tokens.config import (
    INPUT_EMBEDDINGS,
    TrainableTokensConfig,
)
from lora_cli.recipe import load_recipe, resolve_adapter_config
from tests.recipe._util import VALID, problems_of

LORA_SECTION = "adapter:\n  method: lora\n  r: 4\n  lora_alpha: 8\n  target_modules: [query, value]\n"


def _with_adapter(text: str) -> str:
    start, end = VALID.index("adapter:"), VALID.index("training:")
    return VALID[:start] + text + VALID[end:]


def test_lora_recipe_takes_both_options(write):
    recipe = load_recipe(write(_with_adapter(
        LORA_SECTION + "  trainable_token_indices: [3, 5]\n"
        "  target_parameters: [mlp.experts.gate_up_proj]\n"
        "  rank_pattern: {experts.gate_up_proj: 1}\n")))
    config = resolve_adapter_config(recipe.adapter, total_step=None)
    assert config.trainable_token_indices == [3, 5]
    assert config.target_parameters == ["mlp.experts.gate_up_proj"]
    recipe = load_recipe(write(_with_adapter(LORA_SECTION + "  trainable_token_indices: {word_embeddings: [7]}\n")))
    assert resolve_adapter_config(recipe.adapter, total_step=None).trainable_token_indices == {"word_embeddings": [7]}


def test_trainable_tokens_method_keeps_its_own_target(write):
    recipe = load_recipe(write(_with_adapter("adapter:\n  method: trainable_tokens\n  token_indices: [1, 2]\n")))
    config = resolve_adapter_config(recipe.adapter, total_step=None, targets=["query", "value"], heads=["classifier"])
    assert isinstance(config, TrainableTokensConfig)
    assert config.token_indices == [1, 2] and config.target_modules == INPUT_EMBEDDINGS  # not LoRA's defaults
    assert config.modules_to_save == ["classifier"]


def _one(problems: list[str], pattern: str) -> str:
    hits = [p for p in problems if re.search(pattern, p)]
    assert hits, problems
    return hits[0]


def test_options_that_do_not_fit_are_refused_with_file_and_line(write):
    problems = problems_of(write(_with_adapter(
        LORA_SECTION + "  lora_dropout: 0.1\n  target_parameters: [mlp.experts.down_proj]\n")))
    assert re.match(r"recipe\.yaml:\d+: adapter\.lora_dropout", _one(problems, "target_parameters"))

    problems = problems_of(write(_with_adapter(LORA_SECTION + "  target_parameters: experts.*\n")))
    assert re.match(r"recipe\.yaml:\d+: adapter\.target_parameters", _one(problems, "list of parameter names"))

    problems = problems_of(write(_with_adapter(LORA_SECTION + "  trainable_token_indices: [-1]\n")))
    assert re.match(r"recipe\.yaml:\d+: adapter\.trainable_token_indices", _one(problems, "token ids"))

    loha = "adapter:\n  method: loha\n  r: 4\n  target_modules: [query]\n  trainable_token_indices: [1]\n"
    assert re.match(r"recipe\.yaml:\d+: adapter\.trainable_token_indices", _one(problems_of(write(_with_adapter(loha))),
                                                                               "not a loha setting"))

    adalora = ("adapter:\n  method: adalora\n  init_r: 4\n  target_r: 2\n  total_step: 10\n"
               "  target_modules: [query]\n  target_parameters: [mlp.experts.down_proj]\n")
    assert re.match(r"recipe\.yaml:\d+: adapter\.target_parameters",
                    _one(problems_of(write(_with_adapter(adalora))), "not supported by adalora"))

    tokens = "adapter:\n  method: trainable_tokens\n  token_indices: []\n"
    assert re.match(r"recipe\.yaml:\d+: adapter\.token_indices", _one(problems_of(write(_with_adapter(tokens))),
                                                                      "non-empty list"))


# ----------------------------------------------------------------- end to end
def _train_recipe(tmp_path, adapter: dict):
    import yaml

    from tests.helpers_text import TINY_CONFIGS, make_tokenizer, prompt_rows, write_jsonl

    tok_dir = make_tokenizer(tmp_path / "tokenizer")
    write_jsonl(tmp_path / "train.jsonl", prompt_rows())
    recipe = {
        "name": "t", "task": "causal-lm", "output_dir": str(tmp_path / "run"), "seed": 0,
        "model": {"config": TINY_CONFIGS["gpt2"], "tokenizer": str(tok_dir)},
        "data": {"train_file": str(tmp_path / "train.jsonl"), "max_length": 32,
                 "prompt_column": "prompt", "completion_column": "completion"},
        "adapter": adapter,
        "training": {"max_steps": 3, "learning_rate": 5e-2, "per_device_train_batch_size": 8,
                     "per_device_eval_batch_size": 64, "logging_steps": 2, "save_strategy": "no",
                     "eval_strategy": "no", "use_cpu": True},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("adapter", [
    {"method": "trainable_tokens", "token_indices": [4, 5, 6, 7, 8, 9]},
    {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True,
     "trainable_token_indices": [4, 5, 6, 7, 8, 9]},
    {"method": "adalora", "init_r": 4, "target_r": 2, "lora_alpha": 8, "tinit": 1, "tfinal": 1, "deltaT": 1,
     "target_modules": ["c_attn"], "fan_in_fan_out": True, "trainable_token_indices": [4, 5, 6, 7, 8, 9]},
], ids=["alone", "beside-lora", "beside-adalora"])
def test_train_then_reload_merge_and_peft_agree(tmp_path, adapter):
    from transformers import AutoModelForCausalLM

    from lora_cli.inference.loading import load_run
    from lora_cli.training.pipeline import run_training
    from tests.helpers_text import assert_merge_and_peft_agree, eval_batch

    run_dir = run_training(_train_recipe(tmp_path, adapter))
    run = load_run(run_dir, device="cpu")
    layer = run.model.base_model.transformer.wte
    assert type(layer).__name__ in ("TrainableTokensLayer", "TokenAdapterLayer")
    assert type(run.model.base_model.lm_head).__name__ == type(layer).__name__  # GPT-2 ties lm_head to wte
    assert_merge_and_peft_agree(run, AutoModelForCausalLM, eval_batch(run))


def test_target_parameters_alone_get_no_default_target_modules(write):
    """A LoRA section with target_parameters and no target_modules adapts the parameters only:
    the model's default targets are not added behind the user's back."""
    recipe = load_recipe(write(_with_adapter(
        "adapter:\n  method: lora\n  r: 4\n  target_parameters: [mlp.experts.gate_up_proj]\n")))
    config = resolve_adapter_config(recipe.adapter, total_step=None, targets=["query", "value"])
    assert config.target_parameters == ["mlp.experts.gate_up_proj"]
    assert config.target_modules == []
    recipe = load_recipe(write(_with_adapter("adapter:\n  method: lora\n  r: 4\n")))
    assert resolve_adapter_config(recipe.adapter, total_step=None, targets=["query", "value"]).target_modules == [
        "query", "value"]  # without target_parameters the defaults still apply
