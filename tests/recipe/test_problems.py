"""Bad recipes: each problem names the file, the line, the key, the value and the fix."""

from __future__ import annotations

import pytest

from lora_cli.errors import ProblemsError, UserInputError
from lora_cli.recipe import RecipeError, load_recipe, resolve_adapter_config
from tests.recipe._util import VALID, problems_of


def bad(write, old: str, new: str) -> list[str]:
    assert old in VALID
    return problems_of(write(VALID.replace(old, new, 1)))


def test_recipe_error_is_a_user_input_error():
    assert issubclass(RecipeError, ProblemsError) and issubclass(RecipeError, UserInputError)
    assert RecipeError([]).exit_code == 2


# ------------------------------------------------------------------ unknown keys
def test_unknown_top_level_key(write):
    assert bad(write, "task:", "sed: 1\ntask:") == [
        "recipe.yaml:2: sed: is not a recipe key (got 1; did you mean seed?)"
    ]


def test_unknown_model_key(write):
    assert bad(write, "  config:", "  revison: main\n  config:") == [
        "recipe.yaml:4: model.revison: is not a recipe key (got 'main'; did you mean revision?)"
    ]


def test_unknown_data_key(write):
    assert bad(write, "  val_split: 0.2", "  val_splt: 0.2") == [
        "recipe.yaml:14: data.val_splt: is not a recipe key (got 0.2; did you mean val_split?)"
    ]


def test_unknown_adapter_field(write):
    assert bad(write, "  lora_alpha: 8", "  lora_alfa: 8") == [
        "recipe.yaml:18: adapter.lora_alfa: is not a lora setting (got 8; did you mean lora_alpha?)"
    ]


def test_adapter_bookkeeping_fields_are_refused(write):
    (line,) = bad(write, "  r: 4", "  r: 4\n  task_type: SEQ_CLS")
    assert line.startswith("recipe.yaml:18: adapter.task_type: is set automatically by loracli")


def test_unknown_training_key(write):
    assert bad(write, "  learning_rate: 5e-3", "  learnin_rate: 5e-3") == [
        "recipe.yaml:22: training.learnin_rate: is not a TrainingArguments field (got 0.005; did you mean learning_rate?)"
    ]


@pytest.mark.parametrize(
    ("key", "fix"),
    [
        ("output_dir", "use the top-level output_dir"),
        ("remove_unused_columns", "sets it automatically"),
        ("label_names", "sets it automatically"),
        ("seed", "use the top-level seed"),
        ("logging_dir", "TENSORBOARD_LOGGING_DIR"),
        ("disable_tqdm", "its own progress"),
    ],
)
def test_training_keys_loracli_controls(write, key, fix):
    (line,) = bad(write, "  num_train_epochs: 1", f"  num_train_epochs: 1\n  {key}: x")
    assert line.startswith(f"recipe.yaml:24: training.{key}: cannot be set in training")
    assert fix in line


# -------------------------------------------------------------------- bad values
def test_wrong_types(write):
    text = VALID.replace("name: tiny", "name: tiny\nseed: forty-two").replace(
        "  num_train_epochs: 1", "  num_train_epochs: three\n  fp16: 1"
    )
    assert problems_of(write(text)) == [
        "recipe.yaml:2: seed: must be an integer (got 'forty-two')",
        "recipe.yaml:24: training.num_train_epochs: must be a number (got 'three')",
        "recipe.yaml:25: training.fp16: must be true or false (got 1)",
    ]


def test_training_enum_did_you_mean(write):
    (line,) = bad(write, "  num_train_epochs: 1", "  num_train_epochs: 1\n  eval_strategy: epoc")
    assert line == (
        "recipe.yaml:24: training.eval_strategy: must be one of 'no', 'steps', 'epoch' (got 'epoc'; did you mean epoch?)"
    )


def test_training_negative_learning_rate(write):
    assert bad(write, "  learning_rate: 5e-3", "  learning_rate: -1e-3") == [
        "recipe.yaml:22: training.learning_rate: must be > 0 (got -0.001)"
    ]


def test_load_best_model_needs_matching_strategies(write):
    (line,) = bad(
        write, "  num_train_epochs: 1",
        "  num_train_epochs: 1\n  eval_strategy: epoch\n  save_strategy: steps\n  load_best_model_at_end: true",
    )
    assert line.startswith("recipe.yaml:26: training.load_best_model_at_end: needs save_strategy to match")


@pytest.mark.parametrize("r", ["0", "-2"])
def test_rank_must_be_positive(write, r):
    assert bad(write, "  r: 4", f"  r: {r}") == [f"recipe.yaml:17: adapter.r: must be an integer >= 1 (got {r})"]


@pytest.mark.parametrize("p", ["1.0", "-0.1", "1.5"])
def test_dropout_outside_unit_interval(write, p):
    (line,) = bad(write, "  r: 4", f"  r: 4\n  lora_dropout: {p}")
    assert line.startswith(f"recipe.yaml:18: adapter.lora_dropout: must be a number in [0, 1) (got {p}")


def test_unknown_init(write):
    (line,) = bad(write, "  r: 4", "  r: 4\n  init_lora_weights: gausian")
    assert line.startswith("recipe.yaml:18: adapter.init_lora_weights: must be one of")
    assert "(got 'gausian')" in line


def test_unknown_method_did_you_mean(write):
    assert bad(write, "  method: lora", "  method: lorra") == [
        "recipe.yaml:16: adapter.method: is not a known adapter method (got 'lorra'; did you mean lora?)"
    ]


def test_unknown_task_did_you_mean(write):
    (line,) = bad(write, "task: image-classification", "task: image-clasification")
    assert line.startswith("recipe.yaml:2: task: must be one of 'image-classification'")
    assert line.endswith("did you mean image-classification?)")


def test_val_split_range(write):
    (line,) = bad(write, "  val_split: 0.2", "  val_split: 1.5")
    assert line.startswith("recipe.yaml:14: data.val_split: must be less than 1 (got 1.5")


def test_missing_required_sections(write):
    text = "name: x\nadapter: {method: lora}\n"
    lines = problems_of(write(text))
    assert "recipe.yaml:1: task: is required (add `task:` with one of image-classification, causal-lm, seq-cls, seq2seq)" in lines
    assert any(line.startswith("recipe.yaml:1: model: is required") for line in lines)
    assert any(line.startswith("recipe.yaml:1: data: is required") for line in lines)


def test_model_needs_exactly_one_source(write):
    (line,) = bad(write, "  config:", "  name_or_path: google/vit\n  config:")
    assert line.startswith("recipe.yaml:3: model: needs exactly one of name_or_path or config (both are set)")


def test_unknown_model_type(write):
    (line,) = bad(write, "model_type: vit", "model_type: vitt")
    assert line.startswith("recipe.yaml:5: model.config.model_type: is not a transformers model type (got 'vitt'; did you mean vit")


def test_data_needs_exactly_one_source(write):
    (line,) = bad(write, "  builtin: digits", "  builtin: digits\n  dataset: food101")
    assert line.startswith("recipe.yaml:12: data: needs exactly one data source (set: dataset, builtin)")


def test_missing_data_folder(write, tmp_path):
    (line,) = bad(write, "  builtin: digits", "  imagefolder: no/such/folder")
    missing = tmp_path / "no/such/folder"
    assert line.startswith("recipe.yaml:13: data.imagefolder: folder not found (got 'no/such/folder'; ")
    assert f"looked for {missing}; paths are relative to the current directory" in line


def test_missing_train_file(write, tmp_path):
    (line,) = bad(write, "  builtin: digits", "  train_file: train.csv")
    assert line == (
        f"recipe.yaml:13: data.train_file: file not found (got 'train.csv'; looked for {tmp_path / 'train.csv'}; "
        "paths are relative to the current directory)"
    )


def test_many_problems_at_once(write):
    text = (
        VALID.replace("  r: 4", "  r: 0")
        .replace("  lora_alpha: 8", "  lora_alfa: 8")
        .replace("  learning_rate: 5e-3", "  learnin_rate: 5e-3")
        .replace("hidden_size: 32", "hidden_size: 32\n    bogus_but_free_form: 1")
        .replace("  val_split: 0.2", "  val_split: 0")
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(write(text))
    keys = [p.key for p in info.value.problems]
    assert keys == ["data.val_split", "adapter.r", "adapter.lora_alfa", "training.learnin_rate"]
    message = str(info.value)
    assert message.startswith("invalid recipe recipe.yaml (4 problems):")
    assert "recipe.yaml:18: adapter.r: must be an integer >= 1 (got 0)" in message


# ---------------------------------------------------------------------- the file
def test_missing_file(write):
    with pytest.raises(RecipeError, match=r"nope.yaml: recipe file nope.yaml not found \(check the path"):
        load_recipe("nope.yaml")


def test_empty_file(write):
    path = write("# nothing but a comment\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml:1: the recipe is empty"):
        load_recipe(path)


def test_top_level_must_be_a_mapping(write):
    path = write("- name: x\n- task: y\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml:1: the top level must be a mapping of sections, not a list"):
        load_recipe(path)


def test_yaml_syntax_error_names_its_line(write):
    path = write(VALID.replace("  r: 4", "  r: [4"))
    with pytest.raises(RecipeError, match=r"recipe.yaml:18: YAML syntax error: .*flow sequence \(from line 17\)"):
        load_recipe(path)


def test_duplicate_keys(write):
    assert bad(write, "  r: 4", "  r: 4\n  r: 8") == [
        "recipe.yaml:18: adapter.r: is given twice in the same mapping (keep one of them)"
    ]


# ----------------------------------------------------------------------- AdaLoRA
ADALORA = VALID.replace("  method: lora\n  r: 4\n  lora_alpha: 8\n", "  method: adalora\n  init_r: 6\n  target_r: 4\n  tinit: {tinit}\n  tfinal: {tfinal}\n")


def test_adalora_without_total_step_validates(write):
    recipe = load_recipe(write(ADALORA.format(tinit=10, tfinal=20)))
    assert "total_step" not in recipe.adapter.options
    assert resolve_adapter_config(recipe.adapter, total_step=100).total_step == 100


def test_adalora_schedule_without_budgeting_phase(write):
    text = ADALORA.format(tinit=60, tfinal=50).replace("  target_r: 4", "  target_r: 4\n  total_step: 100")
    (line,) = problems_of(write(text))
    assert line.startswith("recipe.yaml:20: adapter.tinit:")
    assert "tinit" in line and "total_step" in line


def test_adalora_derived_total_step_is_checked_later(write):
    recipe = load_recipe(write(ADALORA.format(tinit=60, tfinal=50)))
    with pytest.raises(RecipeError, match=r"recipe.yaml:19: adapter.tinit: .*total_step 100 was derived"):
        resolve_adapter_config(recipe.adapter, total_step=100)


def test_adalora_refuses_sharding_at_the_training_line(write):
    """AdaLoRA scores whole gradients: FSDP / DeepSpeed are refused before anything loads."""
    text = ADALORA.format(tinit=1, tfinal=1) + "  fsdp: full_shard\n"
    (line,) = problems_of(write(text))
    assert line.startswith(f"recipe.yaml:{len(text.splitlines())}: training.fsdp:")  # the line that asks for it
    assert "AdaLoRA's rank allocator" in line and "plain DDP" in line
    assert load_recipe(write(VALID + "  fsdp: full_shard\n")).training["fsdp"] == "full_shard"  # LoRA shards


def test_adalora_total_step_is_not_invented_at_validation(write):
    """Every other AdaLoRA problem is still found without a total_step (no placeholder stands in)."""
    text = ADALORA.format(tinit=1, tfinal=1).replace("  target_r: 4", "  target_r: 4\n  beta1: 1.5")
    (line,) = problems_of(write(text))
    assert "adapter.beta1" in line and "total_step" not in line


def test_imagefolder_needs_a_train_subfolder(write, tmp_path):
    (tmp_path / "flat").mkdir()
    (line,) = bad(write, "  builtin: digits", "  imagefolder: flat")
    assert line.startswith("recipe.yaml:13: data.imagefolder: has no train/ sub-folder (got 'flat'")


def test_extends_must_be_a_path(write):
    with pytest.raises(RecipeError, match=r"recipe.yaml:1: extends: must be the path of another recipe \(got 3"):
        load_recipe(write("extends: 3\n"))


def test_sharding_settings(write, monkeypatch, tmp_path):
    # fsdp: true is the form transformers recommends; the older strings still pass
    for value in ("true", "full_shard"):
        assert load_recipe(write(VALID.replace("  num_train_epochs: 1", f"  num_train_epochs: 1\n  fsdp: {value}")))
    missing = tmp_path / "nowhere" / "ds.json"
    got = bad(write, "  num_train_epochs: 1", f"  num_train_epochs: 1\n  deepspeed: {missing}")
    assert any("training.deepspeed: file not found" in p and str(missing) in p for p in got), got
    got = bad(write, "  num_train_epochs: 1", f"  num_train_epochs: 1\n  fsdp: true\n  fsdp_config: {missing}")
    assert any("training.fsdp_config: file not found" in p for p in got), got
    # a mapping in the recipe needs no file; without the package it says how to get it
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    got = bad(write, "  num_train_epochs: 1", "  num_train_epochs: 1\n  deepspeed: {zero_optimization: {stage: 3}}")
    assert any("needs the deepspeed package" in p and "pip install 'loracli[deepspeed]'" in p for p in got), got


def test_a_key_of_another_tasks_data_is_named_with_its_task(write):
    (line,) = problems_of(write(VALID.replace("  val_split: 0.2", "  val_split: 0.2\n  prompt_column: q")))
    assert line.startswith("recipe.yaml:15: data.prompt_column: is not a image-classification data setting")
    assert "it is for task causal-lm" in line


def test_run_recipes_of_the_flat_data_section_still_load(write):
    """recipe.yaml of runs from the single flat data section lists every task's keys at their defaults."""
    flat = "  text_column: text\n  max_length: 512\n  max_target_length: 128\n  completion_only_loss: false\n"
    recipe = load_recipe(write(VALID.replace("  val_split: 0.2", "  val_split: 0.2\n" + flat)))
    assert recipe == load_recipe(write(VALID, "plain.yaml"))
    with pytest.raises(RecipeError, match="data.max_length: is not a image-classification data setting"):
        load_recipe(write(VALID.replace("  val_split: 0.2", "  val_split: 0.2\n  max_length: 64"), "changed.yaml"))
