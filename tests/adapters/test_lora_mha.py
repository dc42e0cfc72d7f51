"""LoRA on ``nn.MultiheadAttention`` (lora_cli/adapters/methods/lora/mha.py), against PEFT 0.21.

Files both ways, merging and gradients are in test_lora_more_layers.py and the contract;
this file pins down the behaviour behind them: what PEFT's file means (the out_proj update
counts twice), what is refused, and the eval fast path of ``nn.TransformerEncoderLayer``.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

from lora_cli.adapters import LoraConfig, get_adapter_model
from lora_cli.adapters.methods.lora.mha import PEFT_OUT_PROJ_FACTOR
from lora_cli.errors import TargetingError
from tests.adapters._layers import AttentionNet

X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model(X).logits


def _by_hand(base: nn.Module, layer, factor: float) -> torch.Tensor:
    """The base with in_proj += s B A and out_proj += factor * s B_o A_o, written into the weights."""
    out = layer.base_layer.out_proj
    plain = copy.deepcopy(base)
    with torch.no_grad():
        plain.attn.in_proj_weight += layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        plain.attn.out_proj.weight += factor * out.scaling["default"] * out.lora_B["default"].weight @ out.lora_A["default"].weight
    return _logits(plain)


def test_peft_counts_the_out_proj_update_twice_and_so_do_we(tmp_path):
    base = AttentionNet().eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=6, target_modules=["attn"], init_lora_weights=False)).eval()
    layer = theirs.base_model.model.attn
    assert PEFT_OUT_PROJ_FACTOR == 2
    torch.testing.assert_close(_logits(theirs), _by_hand(base, layer, 2), atol=1e-5, rtol=0)
    assert (_logits(theirs) - _by_hand(base, layer, 1)).abs().max() > 1e-2
    theirs.save_pretrained(tmp_path)
    ours = get_adapter_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=6, target_modules=["attn"]))
    ours.load_adapter_state_dict({k: v for k, v in peft.utils.get_peft_model_state_dict(theirs).items()})
    torch.testing.assert_close(_logits(ours.eval()), _by_hand(base, layer, 2), atol=1e-5, rtol=0)


def test_transformer_encoder_layer_uses_the_adapter_in_eval():
    """TransformerEncoderLayer's fused eval path reads the attention's weights itself; PEFT's
    adapter is skipped there (eval output == base), loracli turns the fused path off."""
    torch.manual_seed(0)
    base = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    config = {"r": 2, "target_modules": ["self_attn"], "init_lora_weights": False}
    ours = get_adapter_model(copy.deepcopy(base), LoraConfig(**config))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    with torch.no_grad():
        plain = base.eval()(X)
        train_out = ours.train()(X)
        assert (train_out - plain).abs().max() > 1e-2
        torch.testing.assert_close(ours.eval()(X), train_out, atol=1e-5, rtol=0)
        torch.testing.assert_close(theirs.eval()(X), plain, atol=1e-6, rtol=0)  # PEFT 0.21: no effect
        with ours.disable_adapter():
            torch.testing.assert_close(ours(X), plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"use_dora": True}, "target module attn: use_dora is not supported on MultiheadAttention"),
        ({"lora_bias": True}, "target module attn: lora_bias is not supported on MultiheadAttention"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is not supported on MultiheadAttention"),
    ],
    ids=["dora", "lora_bias", "pissa"],
)
def test_unsupported_options_are_refused_with_the_module(options, match):
    with pytest.raises(TargetingError, match=match):
        get_adapter_model(AttentionNet(), LoraConfig(r=2, target_modules=["attn"], **options))


def test_separate_key_value_dims_are_refused_as_in_peft():
    class KV(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4)

    with pytest.raises(TargetingError, match=r"attn \(MultiheadAttention\): LoRA adapts a MultiheadAttention only with one packed in_proj"):
        get_adapter_model(KV(), LoraConfig(r=2, target_modules=["attn"]))
    with pytest.raises(ValueError, match="Only same embed for query/key/value"):
        peft.get_peft_model(KV(), peft.LoraConfig(r=2, target_modules=["attn"]))


def test_lora_dropout_has_no_effect_and_says_so():
    with pytest.warns(UserWarning, match="lora_dropout has no effect on MultiheadAttention"):
        ours = get_adapter_model(AttentionNet(), LoraConfig(r=2, target_modules=["attn"], lora_dropout=0.5, init_lora_weights=False))
    torch.testing.assert_close(_logits(ours.train()), _logits(ours.eval()), atol=1e-6, rtol=0)


def test_two_adapters_switch_and_delete_with_their_out_proj():
    ours = get_adapter_model(AttentionNet(), LoraConfig(r=2, target_modules=["attn"], init_lora_weights=False)).eval()
    first = _logits(ours)
    ours.add_adapter("other", LoraConfig(r=4, target_modules=["attn"], init_lora_weights=False))
    ours.set_adapter("other")
    assert (_logits(ours) - first).abs().max() > 1e-3
    keys = set(ours.get_adapter_state_dict("other"))
    assert keys == {
        "base_model.model.attn.lora_A.weight",
        "base_model.model.attn.lora_B.weight",
        "base_model.model.attn.base_layer.out_proj.lora_A.weight",
        "base_model.model.attn.base_layer.out_proj.lora_B.weight",
    }
    ours.delete_adapter("other")
    torch.testing.assert_close(_logits(ours), first, atol=0, rtol=0)
    assert list(ours.base_model.attn.base_layer.out_proj.r) == ["default"]
