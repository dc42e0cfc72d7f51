"""extends (deep merge, child wins, cycles) and command-line overrides (YAML-typed)."""

from __future__ import annotations

import pytest

from lora_cli.recipe import RecipeError, load_recipe, recipes_dir
from tests.recipe._util import VALID, problems_of


# ----------------------------------------------------------------------- extends
def test_extends_deep_merges_and_the_child_wins(write):
    write(VALID, "base/base.yaml")
    child = write(
        """\
        extends: ../base/base.yaml
        name: child
        adapter:
          r: 16
        training:
          num_train_epochs: 3
        """,
        "recipes/child.yaml",
    )
    recipe = load_recipe(child)
    assert recipe.name == "child"
    assert recipe.adapter.options["r"] == 16
    assert recipe.adapter.options["lora_alpha"] == 8  # from the parent
    assert recipe.adapter.options["target_modules"] == ["query", "value"]
    assert recipe.training == {"learning_rate": 0.005, "num_train_epochs": 3}
    assert recipe.model.config["hidden_size"] == 32


def test_extends_chain_of_three(write):
    write(VALID, "a.yaml")
    write("extends: a.yaml\nname: b\nseed: 1\n", "b.yaml")
    recipe = load_recipe(write("extends: b.yaml\nname: c\n", "c.yaml"))
    assert (recipe.name, recipe.seed) == ("c", 1)


def test_child_can_switch_the_model_source_with_null(write):
    write("name: p\ntask: seq-cls\nmodel: {name_or_path: some/bert}\ndata: {dataset: imdb}\n", "p.yaml")
    recipe = load_recipe(write("extends: p.yaml\nmodel: {name_or_path: null, config: {model_type: bert}}\n", "c.yaml"))
    assert recipe.model.name_or_path is None and recipe.model.config == {"model_type": "bert"}


def test_problems_in_the_parent_point_at_the_parent(write):
    write(VALID.replace("  r: 4", "  r: 0"), "base.yaml")
    child = write("extends: base.yaml\nname: child\nadapter: {lora_alpha: 2.0, lora_alfa: 3}\n")
    assert problems_of(child) == [
        "recipe.yaml:3: adapter.lora_alfa: is not a lora setting (got 3; did you mean lora_alpha?)",
        "base.yaml:17: adapter.r: must be an integer >= 1 (got 0)",
    ]


def test_syntax_error_in_the_parent_points_at_the_parent(write):
    write("name: [x\n", "base.yaml")
    with pytest.raises(RecipeError, match=r"base.yaml:2: YAML syntax error") as info:
        load_recipe(write("extends: base.yaml\n"))
    assert str(info.value).startswith("invalid recipe recipe.yaml")


def test_missing_parent(write):
    with pytest.raises(RecipeError, match=r"recipe.yaml:2: extends: recipe file nothere.yaml not found .*relative to the recipe's folder"):
        load_recipe(write("name: x\nextends: nothere.yaml\n"))


def test_extends_cycle(write):
    write("extends: b.yaml\nname: a\n", "a.yaml")
    write("extends: a.yaml\n", "b.yaml")
    with pytest.raises(RecipeError, match=r"b.yaml:1: extends: makes a cycle of recipes .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_recipe("a.yaml")


def test_self_extension_is_a_cycle(write):
    with pytest.raises(RecipeError, match="makes a cycle"):
        load_recipe(write("extends: recipe.yaml\n"))


# --------------------------------------------------------------------- overrides
def test_a_child_that_switches_method_writes_its_own_adapter_section(write):
    """LoRA's lora_alpha is no LoHa setting: the parent's adapter section is left out when the
    child names another method; model, data and training still come from the parent."""
    write(VALID.replace("  lora_alpha: 8\n", "  lora_alpha: 8\n  lora_dropout: 0.1\n"), "base.yaml")
    recipe = load_recipe(write("extends: base.yaml\nname: c\nadapter:\n  method: loha\n  alpha: 4\n", "c.yaml"))
    assert recipe.adapter.method == "loha"
    assert recipe.adapter.options["alpha"] == 4 and recipe.adapter.options["r"] == 8  # LoHa's default r
    assert recipe.adapter.options["target_modules"] is None  # not the parent's [query, value]
    assert recipe.model.config["hidden_size"] == 32 and recipe.training["learning_rate"] == 0.005
    # the same method merges key by key, as before (method written or left to its default)
    same = load_recipe(write("extends: base.yaml\nname: d\nadapter:\n  method: lora\n  r: 2\n", "d.yaml"))
    assert (same.adapter.options["r"], same.adapter.options["lora_dropout"]) == (2, 0.1)
    write(VALID.replace("  method: lora\n", ""), "implicit.yaml")
    same = load_recipe(write("extends: implicit.yaml\nname: e\nadapter:\n  method: lora\n  r: 2\n", "e.yaml"))
    assert same.adapter.options["target_modules"] == ["query", "value"]


def test_extends_a_shipped_recipe_from_anywhere(write):
    recipe = load_recipe(write("extends: shipped:quickstart.yaml\nname: mine\nadapter:\n  r: 4\n", "deep/mine.yaml"))
    assert (recipe.name, recipe.adapter.options["r"]) == ("mine", 4)
    assert recipe.model.config["model_type"] == "vit" and recipe.data.builtin == "digits"


def test_extends_an_unknown_shipped_recipe(write):
    (line,) = problems_of(write("extends: shipped:quickstrat.yaml\nname: mine\n"))
    assert line == ("recipe.yaml:1: extends: names no shipped recipe (got 'shipped:quickstrat.yaml'; "
                    "did you mean shipped:quickstart.yaml?)")
    (line,) = problems_of(write("extends: shipped:../pyproject.toml\nname: mine\n"))
    assert line.startswith("recipe.yaml:1: extends: must name a file inside the shipped recipes folder "
                           "(got 'shipped:../pyproject.toml'; write shipped:<path relative to that folder>")


def test_shipped_data_paths(write):
    text = VALID.replace("task: image-classification", "task: seq-cls").replace(
        "model:\n  config:\n    model_type: vit", "model:\n  config:\n    model_type: bert").replace(
        "  builtin: digits\n", "  train_file: shipped:data/sentiment.csv\n  text_column: text\n  label_column: label\n")
    text = text.replace("    image_size: 32\n    patch_size: 8\n", "")
    recipe = load_recipe(write(text))
    assert recipe.data.train_file == str(recipes_dir() / "data" / "sentiment.csv")
    lines = problems_of(write(text.replace("data/sentiment.csv", "data/nope.csv")))
    assert lines == [f"recipe.yaml:11: data.train_file: file not found (got 'shipped:data/nope.csv'; looked for "
                     f"{recipes_dir() / 'data' / 'nope.csv'}; shipped: paths are inside {recipes_dir()})"]
    lines = problems_of(write(text.replace("data/sentiment.csv", "../../etc/passwd")))
    assert len(lines) == 1 and lines[0].startswith(
        "recipe.yaml:11: data.train_file: must name a file inside the shipped recipes folder (got 'shipped:../../etc/passwd'")


def test_overrides_are_yaml_typed(write):
    recipe = load_recipe(
        write(VALID),
        [
            "training.learning_rate=1e-3",
            "training.fp16=false",
            "adapter.r=8",
            "adapter.target_modules=[query, key, value]",
            "data.max_train_samples=100",
            "name=other",
            "model.config.hidden_size=64",
        ],
    )
    assert recipe.training["learning_rate"] == 0.001 and isinstance(recipe.training["learning_rate"], float)
    assert recipe.training["fp16"] is False
    assert recipe.adapter.options["r"] == 8
    assert recipe.adapter.options["target_modules"] == ["query", "key", "value"]
    assert recipe.data.max_train_samples == 100
    assert recipe.name == "other" and recipe.output_dir == "runs/other"
    assert recipe.model.config["hidden_size"] == 64


def test_override_can_switch_the_method(write):
    text = VALID.replace("  lora_alpha: 8\n", "")
    recipe = load_recipe(write(text), ["adapter.alpha=4", "adapter.method=loha"])
    assert recipe.adapter.method == "loha" and recipe.adapter.options["alpha"] == 4


@pytest.mark.parametrize(
    ("item", "hint"),
    [
        ("training.learnin_rate=1", "did you mean training.learning_rate?"),
        ("adapter.lora_alfa=3", "did you mean adapter.lora_alpha?"),
        ("model.foo=1", "valid keys here: name_or_path, config, revision, trust_remote_code, processor, tokenizer, quantization, "
                        "gguf_file"),
        ("modle.name_or_path=x", "did you mean model?"),
        ("data.builtin.x=1", "data.builtin has no sub-keys"),
    ],
)
def test_override_for_a_key_not_in_the_schema(write, item, hint):
    key = item.split("=")[0]
    (line,) = problems_of(write(VALID), [item])
    assert line == f"override {item!r}: {key}: names a key that is not in the recipe schema ({hint})"


def test_malformed_override(write):
    assert problems_of(write(VALID), ["learning_rate"]) == [
        "override 'learning_rate': learning_rate: is not of the form key.path=value (or ~key.path to remove a key)"
    ]


def test_bad_override_value_points_at_the_override(write):
    lines = problems_of(write(VALID), ["adapter.r=0", "training.fp16=maybe"])
    assert lines == [
        "override 'adapter.r=0': adapter.r: must be an integer >= 1 (got 0)",
        "override 'training.fp16=maybe': training.fp16: must be true or false (got 'maybe')",
    ]


def test_override_and_file_problems_together(write):
    text = VALID.replace("  r: 4", "  r: -1")
    lines = problems_of(write(text), ["training.lr=1"])
    assert lines[0] == "recipe.yaml:17: adapter.r: must be an integer >= 1 (got -1)"
    assert lines[1].startswith("override 'training.lr=1': training.lr: names a key")


def test_tilde_removes_a_key(write):
    path = write(VALID)
    recipe = load_recipe(path, ["~training.num_train_epochs", "~adapter.modules_to_save"])
    assert recipe.training == {"learning_rate": 0.005}  # the Trainer's default epochs apply
    assert recipe.adapter.options["modules_to_save"] is None  # the method's default
    assert "num_train_epochs" not in recipe.to_yaml()
    # a required key removed is reported like a missing one
    assert any("model: is required" in p for p in problems_of(path, ["~model"]))


@pytest.mark.parametrize("item, message", [
    ("~training.num_train_epochs=3", "removes a key and takes no value: write ~key.path"),
    ("~training.warmup_steps", "names a key the recipe does not set: nothing to remove"),
    ("~training.num_train_epoch", "did you mean training.num_train_epochs?"),
    ("~", "has an empty key"),
])
def test_bad_removals(write, item, message):
    (problem,) = problems_of(write(VALID), [item])
    assert message in problem and problem.startswith(f"override '{item}'"), problem


def test_switching_method_on_the_command_line_removes_the_old_methods_keys(write):
    """`adapter.method=loha '~adapter.lora_alpha'`: the key is the recipe's, though LoHa has no such
    setting; removing it was refused as 'not in the recipe schema', so the switch needed an edit."""
    path = write(VALID)  # its adapter section sets lora_alpha
    assert any("lora_alpha: is not a loha setting" in p for p in problems_of(path, ["adapter.method=loha"]))
    recipe = load_recipe(path, ["adapter.method=loha", "~adapter.lora_alpha"])
    assert recipe.adapter.method == "loha" and "lora_alpha" not in recipe.adapter.options
    # a misspelt removal (a key the recipe does not set) is still checked against the schema
    problems = problems_of(path, ["~adapter.lora_alpah"])
    assert problems == ["override '~adapter.lora_alpah': adapter.lora_alpah: names a key that is not in the recipe "
                        "schema (did you mean adapter.lora_alpha?)"], problems
