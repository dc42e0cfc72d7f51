"""Shared data for the recipe tests."""

from __future__ import annotations

import pytest

from lora_cli.recipe import RecipeError, load_recipe

VALID = """\
name: tiny
task: image-classification
model:
  config:
    model_type: vit
    hidden_size: 32
    num_hidden_layers: 2
    num_attention_heads: 2
    intermediate_size: 37
    image_size: 32
    patch_size: 8
data:
  builtin: digits
  val_split: 0.2
adapter:
  method: lora
  r: 4
  lora_alpha: 8
  target_modules: [query, value]
  modules_to_save: [classifier]
training:
  learning_rate: 5e-3
  num_train_epochs: 1
"""


def problems_of(path, overrides=()) -> list[str]:
    """The rendered problems of a recipe that must fail."""
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return [p.render() for p in info.value.problems]
