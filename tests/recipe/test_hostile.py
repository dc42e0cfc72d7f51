"""The recipe as an attack surface (issue 11): YAML 1.1's surprises, alias bombs and other
documents past the loader's limits, NaN / infinity, and run names that escape runs/."""

from __future__ import annotations

import math
import time
import tracemalloc

import pytest
import yaml

from lora_cli.recipe import RecipeError, load_recipe
from lora_cli.recipe.yamlio import (
    MAX_ALIASES,
    MAX_DEPTH,
    MAX_FILE_BYTES,
    RecipeLoader,
    dump,
    parse_value,
)
from tests.recipe._util import VALID, problems_of

BOOL_HINT = "use true/false"


def with_training(extra: str) -> str:
    return VALID.replace("  num_train_epochs: 1", "  num_train_epochs: 1\n" + extra.rstrip("\n"))


def only_problem(path, overrides=()) -> str:
    (line,) = problems_of(path, overrides)
    return line


# ================================================================ YAML's surprises
@pytest.mark.parametrize("word", ["no", "yes", "on", "off", "y", "n", "No", "OFF", "Yes"])
def test_yes_no_on_off_are_strings_in_values(word):
    assert parse_value(word) == word
    assert yaml.load(f"k: {word}\n{word}: 1\n", Loader=RecipeLoader) == {"k": word, word: 1}  # noqa: S506


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("True", True), ("TRUE", True), ("false", False), ("False", False), ("FALSE", False)],
)
def test_only_true_and_false_are_booleans(text, value):
    assert parse_value(text) is value


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1:30", "1:30"),  # YAML 1.1: 90 (base 60)
        ("1:30.5", "1:30.5"),
        ("0755", 755),  # YAML 1.1: 493 (octal); 1.2 core: decimal
        ("0o755", 0o755),
        ("0x1F", 31),
        ("-0", 0),
        ("+12", 12),
        ("0b101", "0b101"),  # not in 1.2 core
        ("1_000", "1_000"),
        ("2024-01-01", "2024-01-01"),  # YAML 1.1: a datetime.date
        ("2024-01-01 10:00:00", "2024-01-01 10:00:00"),
        ("=", "="),  # YAML 1.1: the 'value' tag, which SafeLoader could not construct
        ("~", None),
        ("null", None),
        ("", None),
        ("5e-3", 0.005),  # the existing rule: a float without a dot
        ("1E3", 1000.0),
        ("1.", 1.0),
        (".5", 0.5),
        ("-.inf", -math.inf),
        ("+.INF", math.inf),
    ],
)
def test_scalars_follow_the_yaml_1_2_core_schema(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("text", [".nan", ".NaN", ".NAN"])
def test_nan_is_read_as_a_float(text):
    assert math.isnan(parse_value(text))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("!!set {a, b}", "the tag !!set is not allowed"),
        ("!!timestamp 2024-01-01", "the tag !!timestamp is not allowed"),
        ("!!binary aGVsbG8=", "the tag !!binary is not allowed"),
        ("!!python/object/apply:os.system [ls]", "is not allowed in a recipe"),
        ("!!bool yes", "!!bool takes true or false"),
        ("!!int 1_000", "not a YAML 1.2 integer"),
    ],
)
def test_tags_outside_the_core_schema_are_refused(text, fragment):
    with pytest.raises(yaml.YAMLError, match=fragment):
        parse_value(text)


def test_a_refused_tag_in_a_recipe_names_its_line(write):
    line = only_problem(write(VALID.replace("  r: 4", "  r: !!set {a}")))
    assert line.startswith("recipe.yaml:17: YAML error: the tag !!set is not allowed in a recipe")


def test_merge_keys_and_anchors_still_work():
    text = "base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  y: 3\nd: <<\n"
    assert yaml.load(text, Loader=RecipeLoader) == {  # noqa: S506
        "base": {"x": 1, "y": 2}, "c": {"x": 1, "y": 3}, "d": "<<"}


def test_strategies_written_no_in_a_recipe_and_an_override_load(write):
    path = write(with_training("  eval_strategy: no\n  save_strategy: no\n  include_num_input_tokens_seen: no"))
    recipe = load_recipe(path, ["training.logging_strategy=no", "training.hub_strategy=end"])
    assert recipe.training["eval_strategy"] == "no"
    assert recipe.training["save_strategy"] == "no"
    assert recipe.training["logging_strategy"] == "no"
    assert recipe.training["include_num_input_tokens_seen"] == "no"


def test_save_strategy_no_override(write):
    recipe = load_recipe(write(VALID), ["training.save_strategy=no"])
    assert recipe.training["save_strategy"] == "no"


def test_bool_fields_still_take_true_and_false(write):
    path = write(VALID.replace("  val_split: 0.2", "  val_split: 0.2\n  augment: false"))
    recipe = load_recipe(path, ["training.fp16=true", "adapter.use_rslora=True", "model.trust_remote_code=FALSE"])
    assert recipe.data.augment is False
    assert recipe.training["fp16"] is True
    assert recipe.adapter.options["use_rslora"] is True
    assert recipe.model.trust_remote_code is False


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("  val_split: 0.2", "  val_split: 0.2\n  augment: yes", "recipe.yaml:15: data.augment: must be true or false (got 'yes'"),
        ("  num_train_epochs: 1", "  num_train_epochs: 1\n  fp16: on", "recipe.yaml:24: training.fp16: must be true or false (got 'on'"),
        ("  num_train_epochs: 1", "  num_train_epochs: 1\n  tf32: off", "recipe.yaml:24: training.tf32: must be true or false"),
        ("  r: 4", "  r: 4\n  use_dora: no", "recipe.yaml:18: adapter.use_dora: must be true or false (got 'no'"),
        ("  r: 4", "  r: 4\n  init_lora_weights: off", "recipe.yaml:18: adapter.init_lora_weights: must be true or false"),
        ("  config:", "  trust_remote_code: n\n  config:", "recipe.yaml:4: model.trust_remote_code: must be true or false"),
    ],
)
def test_a_bool_field_given_yes_no_on_off_says_use_true_false(write, old, new, where):
    line = only_problem(write(VALID.replace(old, new, 1)))
    assert line.startswith(where)
    assert BOOL_HINT in line


@pytest.mark.parametrize(
    ("item", "key"),
    [
        ("training.fp16=yes", "training.fp16"),
        ("training.bf16=off", "training.bf16"),
        ("data.augment=no", "data.augment"),
        ("adapter.use_dora=on", "adapter.use_dora"),
        ("training.include_num_input_tokens_seen=off", "training.include_num_input_tokens_seen"),
        ("training.fsdp=no", "training.fsdp"),
    ],
)
def test_a_bool_override_given_yes_no_on_off_says_use_true_false(write, item, key):
    line = only_problem(write(VALID), [item])
    assert line.startswith(f"override {item!r}: {key}: must be true or false")
    assert BOOL_HINT in line


def test_dump_quotes_strings_either_yaml_version_would_misread():
    data = {"a": ["yes", "no", "on", "0o755", "0755", "1e3", "1:30", "2024-01-01", "=", "True", "null", "x"],
            "b": [1e-05, 0.005, True, None, 42, 493]}
    text = dump(data)
    assert yaml.load(text, Loader=RecipeLoader) == data  # noqa: S506
    assert yaml.safe_load(text) == data  # a YAML 1.1 reader of runs/<name>/recipe.yaml agrees


# ======================================================================== limits
def billion_laughs() -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def refused_quickly(call, seconds: float = 2.0, megabytes: int = 64) -> RecipeError:
    """``call`` raises RecipeError within ``seconds``, and again within ``megabytes`` of Python memory."""
    start = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        call()
    elapsed = time.perf_counter() - start
    assert elapsed < seconds, f"took {elapsed:.2f} s"
    tracemalloc.start()  # slows Python down: measured on a second call
    try:
        with pytest.raises(RecipeError):
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < megabytes * 2**20, f"peaked at {peak / 2**20:.0f} MiB"
    return info.value


def rendered(error: RecipeError) -> list[str]:
    return [p.render() for p in error.problems]


def test_billion_laughs_is_refused_fast_with_bounded_memory(write):
    path = write(VALID + billion_laughs())
    error = refused_quickly(lambda: load_recipe(path))
    (line,) = rendered(error)
    assert line.startswith("recipe.yaml:28: the recipe expands to more than 20,000 values")
    assert "alias bomb" in line


def test_too_many_aliases(write):
    path = write(VALID + "x: &x 1\ny: [" + ", ".join(["*x"] * (MAX_ALIASES + 1)) + "]\n")
    line = only_problem(path)
    assert line.startswith(f"recipe.yaml:25: the recipe uses more than {MAX_ALIASES:,} aliases")


def test_a_recursive_alias_is_refused(write):
    line = only_problem(write(VALID + "loop: &l {again: *l}\n"))
    assert line.startswith("recipe.yaml:24: the recipe has an alias *l inside the list or mapping &l it names")


@pytest.mark.parametrize(
    "nest",
    [
        "[" * 10_000 + "]" * 10_000,
        "{a: " * 10_000 + "1" + "}" * 10_000,
        "- " * 10_000 + "x",
    ],
    ids=["flow lists", "flow mappings", "block lists"],
)
def test_deep_nesting_is_refused_without_recursion_error(write, nest):
    path = write(VALID + "deep: " + nest + "\n" if not nest.startswith("-") else VALID + "deep:\n  " + nest + "\n")
    error = refused_quickly(lambda: load_recipe(path))
    (line,) = rendered(error)
    assert f"nests lists and mappings deeper than {MAX_DEPTH} levels" in line
    assert line.startswith(("recipe.yaml:24:", "recipe.yaml:25:"))


def test_a_10_mb_file_is_refused_before_reading(write, tmp_path):
    path = write(VALID + "# " + "x" * (10 * 2**20) + "\n")
    error = refused_quickly(lambda: load_recipe(path), seconds=1.0)
    (line,) = rendered(error)
    size = (tmp_path / path).stat().st_size
    assert line == (
        f"recipe.yaml: the file is {size:,} bytes, over the {MAX_FILE_BYTES:,}-byte (1 MiB) limit for a recipe file "
        "(a recipe is a few KB of settings; is this file generated, corrupt or hostile?)"
    )


def test_a_file_just_under_the_size_limit_is_read(write):
    path = write(VALID + "# " + "x" * (MAX_FILE_BYTES - len(VALID) - 10) + "\n")
    assert load_recipe(path).name == "tiny"


def test_an_integer_with_thousands_of_digits_is_refused(write):
    # Python itself refuses int() of more than 4,300 digits with a ValueError (a traceback)
    line = only_problem(write(VALID.replace("  r: 4", "  r: " + "9" * 5000)))
    assert line.startswith("recipe.yaml:17: the recipe has an integer of 5,000 digits; the limit is 100")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (billion_laughs(), "base.yaml:5: the recipe expands to more than 20,000 values"),
        ("deep: " + "[" * 10_000 + "]" * 10_000 + "\n", "base.yaml:1: the recipe nests lists and mappings deeper"),
    ],
    ids=["alias bomb", "deep nesting"],
)
def test_the_limits_apply_to_extended_files(write, body, fragment):
    write(body, "base.yaml")
    child = write("extends: base.yaml\n" + VALID)
    error = refused_quickly(lambda: load_recipe(child))
    (line,) = rendered(error)
    assert line.startswith(fragment)


def test_the_size_limit_applies_to_extended_files(write):
    write("# " + "x" * (10 * 2**20) + "\n", "base.yaml")
    child = write("extends: base.yaml\n" + VALID)
    error = refused_quickly(lambda: load_recipe(child), seconds=1.0)
    (line,) = rendered(error)
    assert line.startswith("recipe.yaml:1: extends: base.yaml is 10,485,763 bytes, over the 1,048,576-byte (1 MiB) limit")


def test_a_long_extends_chain_is_refused(write):
    write(VALID, "r0.yaml")
    for i in range(1, 20):
        write(f"extends: r{i - 1}.yaml\n", f"r{i}.yaml")
    with pytest.raises(RecipeError, match="extends: makes a chain of more than 16 recipes, the limit"):
        load_recipe("r19.yaml")
    assert load_recipe("r10.yaml").name == "tiny"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("[" * 10_000 + "]" * 10_000, "nests lists and mappings deeper than 64 levels"),
        ("{a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9], b: &b [" + ", ".join(["*a"] * 9) + "], c: &c ["
         + ", ".join(["*b"] * 9) + "], d: &d [" + ", ".join(["*c"] * 9) + "], e: [" + ", ".join(["*d"] * 9) + "]}",
         "expands to more than 20,000 values"),
        ("x" * (MAX_FILE_BYTES + 1), "over the 1,048,576-byte limit"),
    ],
    ids=["deep", "alias bomb", "too long"],
)
def test_the_limits_apply_to_override_values(write, value, fragment):
    item = "model.config.extra=" + value
    error = refused_quickly(lambda: load_recipe(write(VALID), [item]))
    (line,) = rendered(error)
    assert line.startswith("override 'model.config.extra=")
    assert "model.config.extra: has a value that is past a recipe limit: it " in line
    assert fragment in line


def test_the_cli_refuses_an_alias_bomb_with_exit_2(write, monkeypatch, capsys):
    from tests.recipe.test_cli import run

    path = write(VALID + billion_laughs())
    start = time.perf_counter()
    code, _, err = run(monkeypatch, capsys, "validate", str(path))
    assert time.perf_counter() - start < 5
    assert code == 2
    assert "recipe.yaml:28: the recipe expands to more than 20,000 values" in err
    assert "Traceback" not in err


# =================================================================== bad numbers
FINITE = "must be a finite number"


@pytest.mark.parametrize(
    ("old", "new", "start"),
    [
        ("  learning_rate: 5e-3", "  learning_rate: .nan", "recipe.yaml:22: training.learning_rate"),
        ("  learning_rate: 5e-3", "  learning_rate: .inf", "recipe.yaml:22: training.learning_rate"),
        ("  learning_rate: 5e-3", "  learning_rate: 1e999", "recipe.yaml:22: training.learning_rate"),
        ("  num_train_epochs: 1", "  num_train_epochs: .inf", "recipe.yaml:23: training.num_train_epochs"),
        ("  num_train_epochs: 1", "  num_train_epochs: 1\n  warmup_ratio: -.inf", "recipe.yaml:24: training.warmup_ratio"),
        ("  num_train_epochs: 1", "  num_train_epochs: 1\n  adam_beta1: .nan", "recipe.yaml:24: training.adam_beta1"),
        ("  num_train_epochs: 1", "  num_train_epochs: 1\n  lr_scheduler_kwargs: {min_lr: .nan}",
         "recipe.yaml:24: training.lr_scheduler_kwargs.min_lr"),
        ("  lora_alpha: 8", "  lora_alpha: .nan", "recipe.yaml:18: adapter.lora_alpha"),
        ("  r: 4", "  r: .inf", "recipe.yaml:17: adapter.r"),
        ("  lora_alpha: 8", "  lora_alpha: 8\n  lora_dropout: .nan", "recipe.yaml:19: adapter.lora_dropout"),
        ("  lora_alpha: 8", "  lora_alpha: 8\n  alpha_pattern: {query: .inf}", "recipe.yaml:19: adapter.alpha_pattern.query"),
        ("  lora_alpha: 8", "  lora_alpha: 8\n  rank_pattern: {query: .nan}", "recipe.yaml:19: adapter.rank_pattern.query"),
        ("  val_split: 0.2", "  val_split: .nan", "recipe.yaml:14: data.val_split"),
        ("name: tiny", "name: tiny\nseed: .nan", "recipe.yaml:2: seed"),
        ("    patch_size: 8", "    patch_size: 8\n    layer_norm_eps: .nan", "recipe.yaml:12: model.config.layer_norm_eps"),
    ],
)
def test_nan_and_infinity_are_refused_in_any_section(write, old, new, start):
    assert old in VALID
    line = only_problem(write(VALID.replace(old, new, 1)))
    assert line.startswith(f"{start}: {FINITE} (got ")
    assert "NaN and infinity are not usable settings" in line


def test_nan_in_a_list_points_at_its_key(write):
    line = only_problem(write(VALID.replace("  r: 4", "  r: 4\n  layers_to_transform: [0, .nan]")))
    assert line.startswith(f"recipe.yaml:18: adapter.layers_to_transform: {FINITE} (got nan;")


@pytest.mark.parametrize(
    "item",
    ["training.learning_rate=.nan", "training.learning_rate=-.inf", "adapter.lora_alpha=.NaN", "adapter.r=.inf",
     "data.val_split=1e400", "model.config.hidden_dropout_prob=.nan"],
)
def test_nan_and_infinity_are_refused_in_overrides(write, item):
    key = item.split("=")[0]
    line = only_problem(write(VALID), [item])
    assert line.startswith(f"override {item!r}: {key}: {FINITE} (got ")


@pytest.mark.parametrize("value", ["0", "0.0", "-1e-3"])
def test_a_learning_rate_of_zero_or_less_is_refused(write, value):
    line = only_problem(write(VALID.replace("5e-3", value)))
    assert line.startswith("recipe.yaml:22: training.learning_rate: must be > 0 (got ")


def test_every_problem_is_still_reported_at_once(write):
    text = VALID.replace("5e-3", ".nan").replace("  r: 4", "  r: .inf").replace("name: tiny", "name: ../up")
    lines = problems_of(write(text))
    assert [line.split(": ")[1] for line in lines] == ["name", "adapter.r", "training.learning_rate"]


def test_the_cli_refuses_a_nan_learning_rate_with_exit_2(write, monkeypatch, capsys):
    from tests.recipe.test_cli import run

    code, _, err = run(monkeypatch, capsys, "validate", str(write(VALID)), "training.learning_rate=.nan")
    assert code == 2
    assert f"training.learning_rate: {FINITE}" in err
    assert "Traceback" not in err


# ================================================================== run names
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ('".."', "starts with '.'"),
        ('"."', "starts with '.'"),
        ('"..."', "starts with '.'"),
        ('".hidden"', "starts with '.'"),
        ('"../x"', "contains '/': it must be one folder name, not a path"),
        ('"/etc"', "contains '/'"),
        ('"a/b"', "contains '/'"),
        ('"a\\\\b"', "contains '\\\\'"),
        ('"..\\\\x"', "contains '\\\\'"),
        ('"a\\0b"', "contains the control character '\\x00'"),
        ('"a\\tb"', "contains the control character '\\t'"),
        ('"a\\nb"', "contains the control character '\\n'"),
        ('"a\\x1bb"', "contains the control character '\\x1b'"),
        ('"   "', "is only whitespace"),
        ('" tiny"', "contains ' '"),
        ('"-rf"', "starts with '-'"),
        ('"a b"', "contains ' '"),
        ('"run:1"', "contains ':'"),
        ('"x' + "a" * 100 + '"', "is 101 characters long (the limit is 100)"),
    ],
)
def test_run_names_that_are_not_one_plain_folder_are_refused(write, name, reason):
    line = only_problem(write(VALID.replace("name: tiny", f"name: {name}")))
    assert line.startswith(f"recipe.yaml:1: name: is not a usable run name: it {reason}")
    assert "use letters, digits, '.', '_' and '-', not starting with '.' or '-'" in line


@pytest.mark.parametrize("name", ["tiny", "food101-lora", "run_1.2", "A", "_scratch", "v1.0.0-rc1"])
def test_plain_run_names_are_accepted(write, name):
    recipe = load_recipe(write(VALID.replace("name: tiny", f"name: {name}")))
    assert recipe.output_dir == f"runs/{name}"


def test_a_run_name_override_is_checked_too(write):
    line = only_problem(write(VALID), ["name=../../etc"])
    assert line.startswith("override 'name=../../etc': name: is not a usable run name: it contains '/'")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('""', "must not be empty"),
        ('"  "', "must not be empty"),
        ('"runs/a\\0b"', "contains the control character '\\x00'"),
        ('"runs/a\\nb"', "contains the control character '\\n'"),
        ('"runs/\\x7f"', "contains the control character '\\x7f'"),
    ],
)
def test_bad_output_dirs_are_refused(write, value, message):
    line = only_problem(write(VALID.replace("name: tiny", f"name: tiny\noutput_dir: {value}")))
    assert line.startswith(f"recipe.yaml:2: output_dir: {message} (got ")


@pytest.mark.parametrize("value", ["../elsewhere/run", "/tmp/loracli-runs/x", "my runs/tiny", "~/runs/x"])
def test_output_dir_may_be_any_path_the_user_chooses(write, value):
    assert load_recipe(write(VALID.replace("name: tiny", f"name: tiny\noutput_dir: {value}"))).output_dir == value


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_the_engine_refuses_a_non_finite_alpha_for_library_users_too(value):
    from lora_cli.adapters import LoraConfig
    from lora_cli.errors import AdapterConfigError

    with pytest.raises(AdapterConfigError, match="lora_alpha: must be a finite number"):
        LoraConfig(r=4, lora_alpha=value, target_modules=["query"])
