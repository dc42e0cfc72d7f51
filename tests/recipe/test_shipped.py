"""Every shipped recipe validates and says what the guide says."""

from __future__ import annotations

import pytest

from lora_cli.adapters import available_methods
from lora_cli.recipe import load_recipe, resolve_adapter_config, shipped_recipes
from lora_cli.task_kinds import TASKS

SHIPPED = shipped_recipes()


def test_the_expected_recipes_ship():
    assert {"quickstart", "food101_lora", "food101_loha", "food101_lokr", "food101_adalora"} <= set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipe_validates(name):
    path = SHIPPED[name]
    recipe = load_recipe(path)
    text = path.read_text()
    # the method the file names, or the one of the recipe it extends
    method = text.split("method:", 1)[1].split()[0] if "method:" in text else recipe.adapter.method
    assert method in available_methods(), f"{name} uses {method}, which the engine does not register"
    assert recipe.name and recipe.task in TASKS
    assert recipe.adapter.method == method
    assert resolve_adapter_config(recipe.adapter, total_step=10_000).method == method
    assert isinstance(recipe.training["learning_rate"], float)


@pytest.mark.parametrize("method", ["lora", "loha", "lokr", "adalora"])
def test_food101_recipes_follow_the_peft_guide(method):
    recipe = load_recipe(SHIPPED[f"food101_{method}"])
    assert recipe.model.name_or_path == "google/vit-base-patch16-224-in21k"
    assert recipe.data.dataset == "food101"
    assert recipe.adapter.options["target_modules"] == ["query", "value"]
    assert recipe.adapter.options["modules_to_save"] == ["classifier"]
    assert recipe.training == {
        "learning_rate": 5e-3,
        "per_device_train_batch_size": 128,
        "per_device_eval_batch_size": 128,
        "gradient_accumulation_steps": 4,
        "fp16": True,
        "num_train_epochs": 5,
        "eval_strategy": "epoch",
        "save_strategy": "epoch",
        "load_best_model_at_end": True,
        "metric_for_best_model": "accuracy",
        "logging_steps": 10,
    }
    assert recipe.output_path.as_posix() == f"runs/food101-{method}"


def test_quickstart_is_offline():
    recipe = load_recipe(SHIPPED["quickstart"])
    assert recipe.model.name_or_path is None
    assert recipe.model.config["model_type"] == "vit"
    assert recipe.data.builtin == "digits"
    assert recipe.data.val_split == 0.2
    assert recipe.model_label() == "vit from config"


def test_adalora_total_step_is_derived_later():
    recipe = load_recipe(SHIPPED["food101_adalora"])
    assert "total_step" not in recipe.adapter.options
    assert "total_step" not in recipe.to_yaml()
    assert resolve_adapter_config(recipe.adapter, total_step=5000).total_step == 5000
    with pytest.raises(Exception, match="needs total_step"):
        resolve_adapter_config(recipe.adapter, total_step=None)
