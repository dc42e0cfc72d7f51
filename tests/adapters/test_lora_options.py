"""LoRA options beyond the shapes: ``lora_bias`` (PEFT 0.21's facts) and the fan_in_fan_out warning.

Files both ways and gradients for lora_bias are in test_lora_peft_interop.py and
test_lora_more_layers.py; merged == unmerged is in the contract.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from torch import nn

from lora_cli.adapters import AdaLoraConfig, LoraConfig, get_adapter_model
from lora_cli.errors import AdapterConfigError, LoraCliError, TargetingError
from lora_cli.recipe import RecipeError, load_recipe, resolve_adapter_config
from tests.adapters import _layers
from tests.helpers import tiny_gpt2, tiny_vit
from tests.recipe._util import VALID


def _net(bias: bool = True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5, bias=bias), nn.ReLU(), nn.Linear(5, 3))


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))

# ------------------------------------------------------------------------------- lora_bias


def test_lora_bias_is_on_lora_b_and_merges_into_the_base_bias(tmp_path):
    ours = get_adapter_model(_net(), LoraConfig(r=2, lora_alpha=6, target_modules=["0"], lora_bias=True))
    layer = ours.base_model.get_submodule("0")
    assert torch.count_nonzero(layer.lora_B_bias["default"]) == 0  # init True: a zero update
    _layers.perturb_trainable(ours)
    b = layer.lora_B_bias["default"].detach().clone()
    base_bias = layer.base_layer.bias.detach().clone()
    with torch.no_grad():
        expected = ours(X)
    ours.merge_adapter()
    torch.testing.assert_close(layer.base_layer.bias, base_bias + 3.0 * b)  # s = 6 / 2
    with torch.no_grad():
        torch.testing.assert_close(ours(X), expected, atol=1e-6, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.bias, base_bias, atol=1e-6, rtol=0)
    assert "base_model.model.0.lora_B.bias" in ours.get_adapter_state_dict()
    _layers.assert_merge_matches_peft(ours, X, _net, tmp_path)
    theirs = peft.PeftModel.from_pretrained(_net(), tmp_path).merge_and_unload()
    torch.testing.assert_close(theirs[0].bias, base_bias + 3.0 * b, atol=1e-6, rtol=0)


def test_lora_bias_on_a_layer_without_bias_runs_but_refuses_to_merge():
    ours = get_adapter_model(_net(bias=False), LoraConfig(r=2, target_modules=["0"], lora_bias=True, init_lora_weights=False))
    weight = ours.base_model.get_submodule("0").base_layer.weight.detach().clone()
    for safe in (False, True):
        with pytest.raises(LoraCliError, match=r"has a lora_bias, but Linear\(.*\) has no bias to merge it into"):
            ours.merge_adapter(safe_merge=safe)
        assert torch.equal(ours.base_model.get_submodule("0").base_layer.weight, weight)
    theirs = peft.get_peft_model(_net(bias=False), peft.LoraConfig(r=2, target_modules=["0"], lora_bias=True))
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        theirs.merge_adapter()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"use_dora": True}, "lora_bias: cannot be combined with use_dora"),
        ({"init_lora_weights": "pissa"}, "lora_bias: needs init_lora_weights true or false, not 'pissa'"),
        ({"init_lora_weights": "gaussian"}, "lora_bias: needs init_lora_weights true or false"),
    ],
)
def test_lora_bias_refuses_what_peft_refuses(options, match):
    with pytest.raises(AdapterConfigError, match=match):
        LoraConfig(target_modules=["0"], lora_bias=True, **options)
    with pytest.raises(ValueError, match="lora_bias=True is"):
        peft.get_peft_model(_net(), peft.LoraConfig(target_modules=["0"], lora_bias=True, **options))


def test_lora_bias_is_refused_on_embeddings_and_by_adalora():
    with pytest.raises(TargetingError, match=r"target module 0: lora_bias is not supported on the embedding"):
        get_adapter_model(nn.Sequential(nn.Embedding(5, 4)), LoraConfig(target_modules=["0"], lora_bias=True))
    # PEFT's AdaLoRA accepts lora_bias and silently creates no bias
    with pytest.raises(AdapterConfigError, match="lora_bias: is not supported by AdaLoRA"):
        AdaLoraConfig(target_modules=["0"], lora_bias=True, total_step=10)


def test_recipe_takes_lora_bias_and_rejects_it_with_dora(write):
    recipe = load_recipe(write(VALID.replace("  lora_alpha: 8\n", "  lora_alpha: 8\n  lora_bias: true\n")))
    assert resolve_adapter_config(recipe.adapter, total_step=None).lora_bias is True
    bad = VALID.replace("  lora_alpha: 8\n", "  lora_alpha: 8\n  lora_bias: true\n  use_dora: true\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(write(bad, "bad.yaml"))
    text = "\n".join(p.render() for p in info.value.problems)
    assert "bad.yaml:" in text and "lora_bias" in text and "use_dora" in text, text


@pytest.fixture
def write(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def _write(text: str, name: str = "recipe.yaml"):
        (tmp_path / name).write_text(text, encoding="utf-8")
        return name

    return _write


# ------------------------------------------------------------------------- fan_in_fan_out


def test_fan_in_fan_out_without_gpt2_conv1d_warns():
    with pytest.warns(UserWarning, match=r"fan_in_fan_out: true is for models with GPT-2-style Conv1D layers; .* ViT"):
        get_adapter_model(tiny_vit(), LoraConfig(target_modules=["q_proj"], fan_in_fan_out=True))


def test_fan_in_fan_out_on_gpt2_conv1d_is_quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fan_in_fan_out.*")
        get_adapter_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True))
        get_adapter_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"]))
