"""LoRA on the layers PEFT 0.21 adapts beyond Linear / Conv2d / Embedding, checked against PEFT.

DoRA on Conv2d, Conv1d and Embedding; LoRA and DoRA on ``torch.nn.Conv1d`` (channels
first, not GPT-2's Conv1D) and ``nn.Conv3d``; LoRA and DoRA on grouped convolutions, which
neither tool can merge; ``lora_bias``; ``nn.MultiheadAttention`` (more in test_lora_mha.py).
Every case starts from non-zero adapter weights (``init_lora_weights=False``, then every
trainable tensor perturbed), so a wrong key, shape or formula changes the outputs.
"""

from __future__ import annotations

import re

import peft
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from torch import nn

from lora_cli.adapters import AdapterModel, LoHaConfig, LoKrConfig, LoraConfig, get_adapter_model
from lora_cli.errors import TargetingError, UserInputError
from tests.adapters import _layers

ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:LoRA adapter added to ConvNd layer with groups")


MODELS = {name: _layers.NETS[name] for name in
          ("conv2d", "conv1d", "embedding", "grouped2d", "grouped1d", "conv3d", "attention")}
GROUPED = ("grouped2d", "grouped1d")

CASES = [
    ("conv2d", {"use_dora": True}),
    ("conv2d", {"use_dora": True, "use_rslora": True}),
    ("conv1d", {}),
    ("conv1d", {"use_dora": True}),
    ("embedding", {"use_dora": True}),
    ("grouped2d", {}),
    ("grouped1d", {"r": 6}),
    ("conv3d", {}),
    ("conv3d", {"use_dora": True}),
    ("grouped2d", {"use_dora": True}),
    ("grouped1d", {"r": 6, "use_dora": True}),
    ("attention", {}),
    ("attention", {"use_rslora": True, "r": 3}),
    ("conv2d", {"lora_bias": True}),
    ("conv3d", {"lora_bias": True}),
    ("grouped2d", {"lora_bias": True}),
]
MERGEABLE = [c for c in CASES if c[0] not in GROUPED]
# DoRA feeds dropout(x) through nn.Dropout as PEFT does, so the same seed gives the same masks
TRAINING = CASES + [
    ("conv2d", {"use_dora": True, "lora_dropout": 0.2}),
    ("conv1d", {"use_dora": True, "lora_dropout": 0.2}),
    ("conv3d", {"use_dora": True, "lora_dropout": 0.2}),
    ("grouped2d", {"use_dora": True, "lora_dropout": 0.2}),
]


def _id(case):
    name, kw = case
    return "-".join([name, *(f"{k}={v}" for k, v in kw.items())]) if kw else name


def _config_kwargs(name, kw):
    return {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "target_modules": MODELS[name][1]} | kw


def _ours(name, kw):
    model = get_adapter_model(MODELS[name][0](), LoraConfig(**_config_kwargs(name, kw))).eval()
    _layers.perturb_trainable(model)
    return model


def _theirs(name, kw):
    model = peft.get_peft_model(MODELS[name][0](), peft.LoraConfig(**_config_kwargs(name, kw))).eval()
    _layers.perturb_trainable(model)
    return model


def _out(model, x):
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------------------ the file format, both ways


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_saved_tensors_are_peft_keys_and_shapes(case):
    name, kw = case
    ours = {k: tuple(v.shape) for k, v in _ours(name, kw).get_adapter_state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(_theirs(name, kw)).items()}
    assert ours == theirs
    if kw.get("use_dora") and name != "embedding":  # PEFT keeps a conv's magnitude as (1, out, 1[, 1])
        assert ours["base_model.model.0.lora_magnitude_vector"][:2] == (1, 6)


# ------------------------------------------------------------------------------- merging


@pytest.mark.parametrize("case", MERGEABLE, ids=_id)
def test_merge_roundtrip_and_merged_weights_match_peft(case, tmp_path):
    name, kw = case
    build, _, make_input = MODELS[name]
    _layers.assert_merge_matches_peft(_ours(name, kw), make_input(), build, tmp_path)


@pytest.mark.parametrize("name", GROUPED)
@pytest.mark.parametrize("extra", [{}, {"use_dora": True}, {"lora_bias": True}], ids=["lora", "dora", "lora_bias"])
def test_grouped_conv_is_never_merged(name, extra, tmp_path):
    """The update of a grouped conv's LoRA is dense across groups: it has no place in the
    grouped kernel. Merging is refused, all or nothing, as PEFT refuses it (DoRA too)."""
    x = MODELS[name][2]()
    ours = _ours(name, ({"r": 6} if name == "grouped1d" else {}) | extra)
    weight = ours.base_model.get_submodule("0").base_layer.weight.detach().clone()
    bias = ours.base_model.get_submodule("0").base_layer.bias.detach().clone()
    unmerged = _out(ours, x)
    for merge in (ours.merge_adapter, lambda: ours.merge_adapter(safe_merge=True), ours.merge_and_unload):
        with pytest.raises(UserInputError, match="grouped convolution .* cannot be merged"):
            merge()
        assert torch.equal(ours.base_model.get_submodule("0").base_layer.weight, weight)
        assert torch.equal(ours.base_model.get_submodule("0").base_layer.bias, bias)
        torch.testing.assert_close(_out(ours, x), unmerged, atol=0, rtol=0)
    ours.save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        peft.PeftModel.from_pretrained(MODELS[name][0](), tmp_path).merge_and_unload()


# ------------------------------------------------------------------------------- training


@pytest.mark.parametrize("case", TRAINING, ids=_id)
def test_training_gradients_match_peft(case, tmp_path):
    """Same weights, same input, same dropout draws: every trainable tensor gets PEFT's gradient."""
    name, kw = case
    build, _, make_input = MODELS[name]
    x = make_input()
    theirs = _theirs(name, kw)
    theirs.save_pretrained(tmp_path)
    ours = AdapterModel.from_pretrained(build(), tmp_path, is_trainable=True)
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(5)
        model(x).square().mean().backward()
    their_grads = {
        re.sub(r"\.lora_B\.default\.bias$", ".lora_B_bias.default", re.sub(r"(\.lora_\w+\.default)\.weight$", r"\1", n)): p.grad
        for n, p in theirs.base_model.model.named_parameters() if p.requires_grad
    }
    our_grads = {n: p.grad for n, p in ours.base_model.named_parameters() if p.requires_grad}
    assert our_grads.keys() == their_grads.keys()
    for key, grad in their_grads.items():
        assert grad is not None and grad.abs().max() > 0, key
        torch.testing.assert_close(our_grads[key], grad, atol=1e-6, rtol=1e-5, msg=key)


# ------------------------------------------------------------------------------- refusals


def test_grouped_conv_rank_must_be_a_multiple_of_groups():
    kw = {"r": 3, "target_modules": ["0"]}
    with pytest.raises(TargetingError, match=r"needs r divisible by groups, got r=3; use a multiple of 2"):
        get_adapter_model(_layers.grouped2d_net(), LoraConfig(**kw))
    with pytest.raises(ValueError, match="rank is divisible by groups"):
        peft.get_peft_model(_layers.grouped2d_net(), peft.LoraConfig(**kw))


@pytest.mark.parametrize("config_cls", [LoHaConfig, LoKrConfig], ids=["loha", "lokr"])
def test_lycoris_methods_adapt_torch_conv1d(config_cls):
    """LoHa and LoKr wrap nn.Conv1d too (PEFT parity: tests/adapters/test_lycoris.py)."""
    model = get_adapter_model(_layers.conv1d_net(), config_cls(r=2, target_modules=["0", "2"]))
    assert sorted(model.targets["default"]) == ["0", "2"]


def test_base_rewriting_inits_refuse_torch_conv1d():
    with pytest.raises(TargetingError, match="init_lora_weights='pissa' supports Linear and GPT-2 Conv1D .* not Conv1d"):
        get_adapter_model(_layers.conv1d_net(), LoraConfig(r=2, target_modules=["0"], init_lora_weights="pissa"))
    # PEFT raises "Unknown initialization" for orthogonal on convolutions; loracli names the layer
    with pytest.raises(TargetingError, match="init_lora_weights='orthogonal' supports Linear .* not Conv1d"):
        get_adapter_model(_layers.conv1d_net(), LoraConfig(r=2, target_modules=["0"], init_lora_weights="orthogonal"))
    with pytest.raises(TargetingError, match="'orthogonal' .* not Conv2d"):
        get_adapter_model(nn.Sequential(nn.Conv2d(3, 4, 3)), LoraConfig(r=2, target_modules=["0"], init_lora_weights="orthogonal"))


@pytest.mark.parametrize("kw", [{"dilation": 2, "padding": 2}, {"padding": 1, "padding_mode": "reflect"}], ids=["dilated", "reflect"])
def test_dilated_or_padded_conv_warns_of_peft_difference_and_merges_exactly(kw):
    """PEFT runs A undilated and zero-padded whatever the base does (and its own merge then
    disagrees with its forward); loracli follows the base, so merging stays exact, and says so."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv1d(3, 4, 3, **kw))
    x = _layers.seeded_randn(2, 3, 9)
    with pytest.warns(UserWarning, match="different outputs in PEFT"):
        ours = get_adapter_model(base, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False)).eval()
    unmerged = _out(ours, x)
    with ours.disable_adapter():
        assert (unmerged - _out(ours, x)).abs().max() > 20 * ATOL, "the adapter has no effect"
    ours.merge_adapter()
    torch.testing.assert_close(_out(ours, x), unmerged, atol=ATOL, rtol=0)
