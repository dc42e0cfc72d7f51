"""Recipes: YAML -> typed, validated :class:`Recipe` (extends, overrides, one error for all problems)."""

from lora_cli.recipe.adapter import resolve_adapter_config
from lora_cli.recipe.data import (
    CausalLMData,
    DataSection,
    ImageData,
    Seq2SeqData,
    SeqClsData,
)
from lora_cli.recipe.errors import RecipeError, RecipeProblem
from lora_cli.recipe.loader import load_recipe
from lora_cli.recipe.schema import (
    AdapterSection,
    ModelSection,
    Recipe,
    dump_recipe_dict,
)
from lora_cli.recipe.shipped import find_shipped, recipes_dir, shipped_recipes
from lora_cli.recipe.training import optimizer_steps

__all__ = [
    "AdapterSection",
    "CausalLMData",
    "DataSection",
    "ImageData",
    "Seq2SeqData",
    "SeqClsData",
    "ModelSection",
    "Recipe",
    "RecipeError",
    "RecipeProblem",
    "dump_recipe_dict",
    "find_shipped",
    "load_recipe",
    "optimizer_steps",
    "recipes_dir",
    "resolve_adapter_config",
    "shipped_recipes",
]
