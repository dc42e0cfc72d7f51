"""Loading a valid recipe: types, defaults, paths, to_yaml round trip."""

from __future__ import annotations

from pathlib import Path

from lora_cli.recipe import load_recipe, resolve_adapter_config
from lora_cli.recipe.yamlio import parse_value
from tests.recipe._util import VALID


def test_valid_recipe_loads_with_defaults(write):
    recipe = load_recipe(write(VALID))
    assert recipe.name == "tiny" and recipe.task == "image-classification"
    assert recipe.seed == 42
    assert recipe.output_dir == "runs/tiny" and recipe.output_path == Path("runs/tiny")
    assert recipe.source == Path("recipe.yaml").resolve()
    assert recipe.data.image_column == "image" and recipe.data.eval_split == "validation"
    assert recipe.adapter.method == "lora" and recipe.adapter.options["r"] == 4
    assert recipe.training == {"learning_rate": 0.005, "num_train_epochs": 1}
    config = resolve_adapter_config(recipe.adapter, total_step=None)
    assert (config.r, config.lora_alpha, config.target_modules) == (4, 8, ["query", "value"])
    assert recipe.model_label() == "vit from config"


def test_exponent_floats_read_as_floats():
    assert parse_value("5e-3") == 0.005 and isinstance(parse_value("1e-3"), float)
    assert parse_value("1E+2") == 100.0 and parse_value("-2.5e-1") == -0.25
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("1e3x") == "1e3x"
    import yaml

    assert yaml.safe_load("5e-3") == "5e-3", "the stock SafeLoader must stay untouched"


def test_paths_become_absolute(write, imagefolder, tmp_path):
    text = VALID.replace("  builtin: digits\n", f"  imagefolder: {imagefolder.relative_to(tmp_path)}\n")
    recipe = load_recipe(write(text))
    assert recipe.data.imagefolder == str(imagefolder.absolute())


def test_text_task_tokenizer_defaults_to_the_model(write):
    text = (
        "name: t\ntask: seq-cls\nmodel: {name_or_path: some/bert}\n"
        "data: {dataset: glue, dataset_config: sst2, text_column: sentence}\n"
    )
    recipe = load_recipe(write(text))
    assert recipe.model.tokenizer == "some/bert"
    assert recipe.model_label() == "some/bert"


def test_to_yaml_round_trips(write, tmp_path):
    write(VALID, "base.yaml")
    child = write("extends: base.yaml\nadapter: {lora_dropout: 0.05}\n")
    recipe = load_recipe(child, ["training.warmup_steps=3", "seed=7"])
    text = recipe.to_yaml()
    assert "\nextends:" not in text and "lora_dropout: 0.05" in text
    again = load_recipe(write(text, "resolved.yaml"))
    assert again == recipe
    assert resolve_adapter_config(again.adapter, total_step=None) == resolve_adapter_config(recipe.adapter, total_step=None)
    assert again.seed == 7 and again.training["warmup_steps"] == 3
    assert again.adapter.options["use_rslora"] is False  # defaults are written out


def test_equality_sees_differences(write):
    a = load_recipe(write(VALID))
    b = load_recipe(write(VALID), ["adapter.r=8"])
    assert a != b
