"""Sizes and patterns that explode: ranks and widths that no model has, and regular expressions that
backtrack catastrophically, are refused at the recipe line before any model loads; the engine bounds
both for library users too."""

from __future__ import annotations

import pytest

from lora_cli.errors import AdapterConfigError
from tests.recipe._util import VALID, problems_of
from tests.recipe.test_cli import run

MODEL_OFFLINE = VALID.replace("""model:
  config:
    model_type: vit
    hidden_size: 32
    num_hidden_layers: 2
    num_attention_heads: 2
    intermediate_size: 37
    image_size: 32
    patch_size: 8
""", "model:\n  name_or_path: nobody/no-such-model\n")


def only_problem(path, overrides=()) -> str:
    lines = problems_of(path, overrides)
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(("old", "new", "start"), [
    ("  r: 4", "  r: 1000000000", "recipe.yaml:17: adapter.r: must be an integer between 1 and 65536"),
    ("  r: 4", "  r: 4\n  rank_pattern: {query: 100000000000}",
     "recipe.yaml:18: adapter.rank_pattern.query: must be an integer between 1 and 65536"),
])
def test_an_absurd_rank_is_refused_at_its_line(write, old, new, start):
    assert only_problem(write(VALID.replace(old, new, 1))).startswith(start)


@pytest.mark.parametrize(("method", "fields", "key"), [
    ("loha", "r: 1000000000\n  alpha: 8", "adapter.r"),
    ("lokr", "r: 1000000000\n  alpha: 8", "adapter.r"),
    ("adalora", "init_r: 1000000000\n  target_r: 2\n  total_step: 10", "adapter.init_r"),
    ("adalora", "init_r: 4\n  target_r: 1000000000\n  total_step: 10", "adapter.target_r"),  # from 0
])
def test_every_method_bounds_its_ranks(write, method, fields, key):
    text = VALID.replace("  method: lora\n  r: 4\n  lora_alpha: 8", f"  method: {method}\n  {fields}")
    line = only_problem(write(text))
    assert f": {key}: must be an integer between " in line and " and 65536 (got 1000000000;" in line


def test_the_refusal_comes_before_any_model_loads(write, monkeypatch, capsys):
    """The model named here does not exist and the hub is offline: had the model been loaded first, the
    message would be about the model."""
    path = write(MODEL_OFFLINE.replace("  r: 4", "  r: 1000000000"))
    code, _, err = run(monkeypatch, capsys, "train", str(path))
    assert code == 2, err
    assert "recipe.yaml:10: adapter.r: must be an integer between 1 and 65536" in err
    assert "no-such-model" not in err and "Traceback" not in err
    assert not (path.parent / "runs").exists()


@pytest.mark.parametrize(("method", "fields", "key"), [
    ("p_tuning", {"num_virtual_tokens": 10**9}, "num_virtual_tokens"),
    ("p_tuning", {"num_virtual_tokens": 8, "encoder_hidden_size": 10**9}, "encoder_hidden_size"),
    ("p_tuning", {"num_virtual_tokens": 8, "encoder_num_layers": 10**6}, "encoder_num_layers"),
    ("p_tuning", {"num_virtual_tokens": 8, "token_dim": 10**9}, "token_dim"),
    ("xlora", {"adapters": {"a": "x"}, "xlora_size": 10**9}, "xlora_size"),
    ("xlora", {"adapters": {"a": "x"}, "xlora_depth": 10**6}, "xlora_depth"),
    ("xlora", {"adapters": {"a": "x"}, "hidden_size": 10**9}, "hidden_size"),
])
def test_widths_and_depths_are_bounded_in_the_engine_config(method, fields, key):
    from lora_cli.adapters import get_method

    with pytest.raises(AdapterConfigError, match=rf"{key}: must be an integer between 1 and \d+"):
        get_method(method).config_cls(task_type="CAUSAL_LM", **fields)


# ------------------------------------------------------------------ regular expressions
CATASTROPHIC = [
    r"(?:(a+)(?=\1))+b",  # a repetition with a back-reference: exponential even for the regex package
    r"(?:(.+)(?=\1))+z",
    r"(.|.)*z",  # exponential on a name of z's, even for the regex package
]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_a_catastrophic_target_modules_regex_is_refused_at_its_line(write, pattern):
    text = VALID.replace("  target_modules: [query, value]", f"  target_modules: '{pattern}'")
    line = only_problem(write(text))
    assert line.startswith("recipe.yaml:19: adapter.target_modules: backtracks catastrophically")


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern", "exclude_modules"])
def test_catastrophic_patterns_are_refused_at_their_line_in_every_field(write, field):
    value = f"\n    '{CATASTROPHIC[1]}': 8" if field != "exclude_modules" else f" '{CATASTROPHIC[1]}'"
    line = only_problem(write(VALID.replace("  r: 4", f"  r: 4\n  {field}:{value}")))
    assert line.startswith(f"recipe.yaml:18: adapter.{field}") and "backtracks catastrophically" in line


@pytest.mark.parametrize("pattern", [
    r".*\.(query|value)",
    r"(\w+\.)*(query|value)",
    r"vit\.layers\.\d+\.attention\.(q|v)_proj",
    r"(?:.*\.)?(q_proj|v_proj)$",
    r"(a+)+$", r"(a|aa)*c", r"(.*)*x",  # exponential for `re`, not for the engine used
])
def test_ordinary_and_bounded_regexes_still_load(write, pattern):
    from lora_cli.recipe import load_recipe

    text = VALID.replace("  target_modules: [query, value]", f"  target_modules: '{pattern}'")
    assert load_recipe(write(text)).adapter.options["target_modules"] == pattern


def test_the_cli_refuses_a_catastrophic_regex_with_exit_2(write, monkeypatch, capsys):
    path = write(MODEL_OFFLINE.replace("  target_modules: [query, value]", f"  target_modules: '{CATASTROPHIC[0]}'"))
    code, _, err = run(monkeypatch, capsys, "train", str(path))
    assert code == 2 and "recipe.yaml:12: adapter.target_modules: backtracks catastrophically" in err
    assert "no-such-model" not in err and "Traceback" not in err
