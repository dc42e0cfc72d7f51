"""Which modules get adapters, rule by rule and layer type by layer type, against PEFT 0.21.

A module that a ``target_modules`` list entry or regex selects is either adapted as PEFT
adapts it, or the whole call fails naming the module, its type and the fix; nothing is
dropped silently, and the saved adapter_config.json names exactly what was adapted.
Deviations from PEFT, each deliberate, are listed in ``DEVIATIONS``.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_cli.adapters import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, get_adapter_model
from lora_cli.errors import TargetingError


class Zoo(nn.Module):
    """One module of every layer type, none called: targeting only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)
        self.gpt2_conv1d = Conv1D(8, 8)
        self.conv1d = nn.Conv1d(4, 4, 3)
        self.conv2d = nn.Conv2d(4, 4, 3)
        self.conv3d = nn.Conv3d(4, 4, 3)
        self.grouped = nn.Conv2d(4, 4, 3, groups=2)
        self.emb = nn.Embedding(10, 8)
        self.mha = nn.MultiheadAttention(8, 2)
        self.norm = nn.LayerNorm(8)
        self.block = nn.Sequential(nn.Linear(8, 8))
        self.deconv = nn.ConvTranspose2d(4, 4, 3)


LAYERS = ["gpt2_conv1d", "conv1d", "conv2d", "conv3d", "grouped", "emb", "mha", "norm", "block", "deconv"]
METHODS = {
    "lora": (LoraConfig, peft.LoraConfig, {"r": 2}),
    "dora": (LoraConfig, peft.LoraConfig, {"r": 2, "use_dora": True}),
    "loha": (LoHaConfig, peft.LoHaConfig, {"r": 2}),
    "lokr": (LoKrConfig, peft.LoKrConfig, {"r": 2}),
    "adalora": (AdaLoraConfig, peft.AdaLoraConfig, {"init_r": 2, "target_r": 1, "total_step": 10}),
}
DEVIATIONS = {
    # loracli adapts GPT-2's Conv1D with LoHa / LoKr (its (in, out) weight is a Linear's, transposed);
    # PEFT 0.21 refuses it
    ("loha", "gpt2_conv1d"): "ours only",
    ("lokr", "gpt2_conv1d"): "ours only",
    # PEFT creates AdaLoRA on a grouped conv, then its forward fails (test_adalora_conv.py)
    ("adalora", "grouped"): "peft only",
}
FORMS = {
    "list": lambda name: [name],
    "regex": lambda name: name,
    "list+linear": lambda name: ["lin", name],
    "regex+linear": lambda name: f"(lin|{name})",
}


def _adapted_by_peft(model) -> set[str] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _adapted(model())
    except (ValueError, TypeError):
        return None


def _adapted(model) -> set[str]:
    if isinstance(model, peft.PeftModel):
        inner = model.base_model.model
        return {p for p, m in inner.named_modules() if hasattr(m, "base_layer") and ".base_layer" not in p}
    return set(model.targets["default"])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_type_is_adapted_as_peft_adapts_it_or_refused(layer, method, form):
    ours_cls, peft_cls, kw = METHODS[method]
    rule = FORMS[form](layer)
    theirs = _adapted_by_peft(lambda: peft.get_peft_model(Zoo(), peft_cls(target_modules=rule, **kw)))
    deviation = DEVIATIONS.get((method, layer))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = _adapted(get_adapter_model(Zoo(), ours_cls(target_modules=rule, **kw)))
    except TargetingError as exc:
        ours = None
        text = str(exc)
        assert layer in text and type(getattr(Zoo(), layer)).__name__ in text, text  # where and what
        assert "exclude_modules" in text, text  # the fix
    if deviation == "ours only":
        assert theirs is None and ours is not None and layer in ours
    elif deviation == "peft only":
        assert ours is None and theirs is not None
    else:
        assert ours == theirs


@pytest.mark.parametrize("method", METHODS)
def test_all_linear_adapts_the_linear_and_gpt2_conv1d_layers_as_peft(method):
    """"all-linear" takes every Linear and GPT-2 Conv1D and nothing else. PEFT also adapts
    the attention's out_proj (to no effect: next test); with LoHa / LoKr PEFT refuses the
    Conv1D, so its "all-linear" fails on GPT-2-style models, where loracli adapts them."""
    ours_cls, peft_cls, kw = METHODS[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = get_adapter_model(Zoo(), ours_cls(target_modules="all-linear", **kw))
    theirs = _adapted_by_peft(lambda: peft.get_peft_model(Zoo(), peft_cls(target_modules="all-linear", **kw)))
    assert _adapted(ours) == {"lin", "block.0", "gpt2_conv1d"}
    if method in ("loha", "lokr"):
        assert theirs is None
    else:
        assert theirs - {"mha.out_proj"} == _adapted(ours)


class _AttentionThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(self.mha(x, x, x, need_weights=False)[0])


def test_attention_out_proj_alone_is_never_adapted(tmp_path):
    """nn.MultiheadAttention reads out_proj.weight itself: an adapter on out_proj alone never
    runs. PEFT 0.21 adapts it anyway (its output does not move); loracli refuses it when
    named, and leaves it out of "all-linear" with a warning."""
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    theirs = peft.get_peft_model(_AttentionThenLinear(), peft.LoraConfig(r=2, target_modules=["out_proj"], init_lora_weights=False))
    torch.testing.assert_close(theirs(x), _AttentionThenLinear()(x), atol=1e-6, rtol=0)

    for rule in (["out_proj"], r"mha\.out_proj", ["proj", "mha.out_proj"]):
        with pytest.raises(TargetingError, match=r"mha\.out_proj \(NonDynamicallyQuantizableLinear\): .* target the attention module itself \('mha'\)"):
            get_adapter_model(_AttentionThenLinear(), LoraConfig(r=2, target_modules=rule))

    with pytest.warns(UserWarning, match=r"'all-linear' leaves out mha\.out_proj: .* list it in target_modules \(mha\)"):
        ours = get_adapter_model(_AttentionThenLinear(), LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    assert ours.targets["default"] == ["proj"]
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert _adapted(peft.PeftModel.from_pretrained(_AttentionThenLinear(), tmp_path)) == {"proj"}, saved


@pytest.mark.parametrize("extra", [["conv3d"], ["mha"]], ids=["conv3d", "mha"])
def test_named_modules_are_all_adapted_and_the_file_says_so(extra, tmp_path):
    """The issue's bug: a listed Conv3d / MultiheadAttention was dropped while the file still
    listed it; PEFT then put a random adapter there. Now both tools adapt the same modules
    and hold the same number of trainable parameters."""
    config = LoraConfig(r=2, target_modules=["lin", *extra], init_lora_weights=False)
    ours = get_adapter_model(Zoo(), config)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(Zoo(), tmp_path, is_trainable=True)
    assert _adapted(theirs) == _adapted(ours) == {"lin", *extra}
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    state = ours.get_adapter_state_dict()
    for key, value in peft.utils.get_peft_model_state_dict(theirs).items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0)


def test_lycoris_refuses_a_listed_layer_it_cannot_adapt_instead_of_dropping_it():
    with pytest.raises(TargetingError, match=r"the loha method cannot adapt: conv3d \(Conv3d\): this method has no adapter"):
        get_adapter_model(Zoo(), LoHaConfig(r=2, target_modules=["lin", "conv3d"]))
    with pytest.raises(TargetingError, match=r"block \(Sequential\): it is not a layer an adapter can wrap .* inside it"):
        get_adapter_model(Zoo(), LoraConfig(r=2, target_modules=["lin", "block"]))
