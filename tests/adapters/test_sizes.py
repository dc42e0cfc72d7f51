"""The engine bounds what a config could make it allocate or compute: a rank larger than the layer
it adapts is refused before any tensor is made, and a user regex is matched with a time bound."""

from __future__ import annotations

import pytest

from lora_cli.adapters import LoHaConfig, LoraConfig, get_adapter_model
from lora_cli.adapters.targeting import matches
from lora_cli.adapters.user_regex import RegexTimeoutError
from lora_cli.errors import TargetingError
from tests.helpers import tiny_gpt2, tiny_vit


@pytest.mark.parametrize("config", [
    LoraConfig(r=60000, target_modules=["query", "value"]),
    LoraConfig(r=4, rank_pattern={"value": 50000}, target_modules=["query", "value"]),
    LoHaConfig(r=60000, target_modules=["query"]),
])
def test_a_rank_above_the_layer_size_is_refused_before_allocating(config):
    base = tiny_vit()
    with pytest.raises(TargetingError, match=r"vit\.layers\.0\.attention\.(q|v)_proj: r=\d+ is larger than the layer "
                                             r"\(32 inputs, 32 outputs\)"):
        get_adapter_model(base, config)
    assert not any("lora_" in n or "hada_" in n for n, _ in base.named_parameters())


def test_ranks_up_to_1024_fit_any_layer_as_in_peft():
    model = get_adapter_model(tiny_gpt2(), LoraConfig(r=1024, target_modules=["c_attn"]))  # (32 -> 96)
    assert model.base_model.transformer.h[0].attn.c_attn.r["default"] == 1024


@pytest.mark.parametrize(("pattern", "expected"), [
    (r"(a+)+$", False), (r"(.|.)*z", False), (r"(a|aa)*c", False), (r"(a+)+\.b", True), (r"(.|.)*\.b", True),
])
def test_regexes_exponential_for_re_match_a_long_module_name_in_bounded_time(pattern, expected):
    """With ``re`` each of these takes about 2**40 steps on this name (it hung); here they answer at once."""
    assert matches("a" * 40 + ".b", pattern) is expected


@pytest.mark.parametrize(("pattern", "name"), [
    (r"(?:(a+)(?=\1))+b", "a" * 40 + ".b"),  # module paths whose first part is a run of one letter
    (r"(?:(.+)(?=\1))+z", "z" * 40 + ".b"),
])
def test_a_regex_no_engine_bounds_is_stopped_and_named(pattern, name):
    """The config checks refuse these at the recipe line; the engine's own time bound is the backstop for
    any such pattern that reaches a match (here called directly): a clear refusal, not a hang."""
    with pytest.raises(RegexTimeoutError, match=rf"took more than 1 s to match the module name '{name[:4]}.*catastroph"):
        matches(name, pattern)


def test_ordinary_regexes_match_as_before():
    assert matches("vit.layers.0.attention.q_proj", r".*\.(q|v)_proj")
    assert not matches("vit.layers.0.attention.k_proj", r".*\.(q|v)_proj")
    assert matches("h.0.attn", r"(\w+\.)*attn")


def test_virtual_tokens_that_fill_the_context_are_refused_before_the_encoder_is_made():
    from lora_cli.adapters import PromptEncoderConfig
    from lora_cli.errors import UserInputError

    config = PromptEncoderConfig(num_virtual_tokens=64, task_type="CAUSAL_LM")  # tiny GPT-2: 64 positions
    with pytest.raises(UserInputError, match=r"num_virtual_tokens 64 fills the model's whole context \(64 positions\)"):
        get_adapter_model(tiny_gpt2(), config)
    small = get_adapter_model(tiny_gpt2(), PromptEncoderConfig(num_virtual_tokens=8, task_type="CAUSAL_LM"))
    assert small.active_config.num_virtual_tokens == 8
