"""LoHa and LoKr on ``torch.nn.Conv1d`` (channels first, not GPT-2's Conv1D), checked against PEFT 0.21.

The model has a padded k=3 conv, a strided grouped k=3 conv and a k=1 conv, so the LoKr
cases reach every factor layout PEFT has on Conv1d: full w1 / w2, low-rank w2 (flattened,
or a Tucker t2 of shape (r, r, k, 1) with ``use_effective_conv2d``), low-rank w1 with
``decompose_both``, and k=1 convs that stay flat. Every case starts from non-zero adapter
weights (``init_weights=False``, then every trainable tensor perturbed).
"""

from __future__ import annotations

import re

import peft
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from torch import nn

from lora_cli.adapters import AdapterModel, LoHaConfig, LoKrConfig, get_adapter_model
from tests.adapters import _layers

ATOL = 1e-5
TARGETS = ["0", "2", "4"]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(64, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(16, 32, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv1d(32, 6, 1),
    )


def _x():
    return torch.randn(2, 64, 10, generator=torch.Generator().manual_seed(1))


# (method, options, file key suffix of layer "0" -> shape): the shapes pin which layout each case reaches
CASES = {
    "loha": ("loha", {"r": 2, "alpha": 5}, {"hada_w1_a": (16, 2), "hada_w1_b": (2, 192)}),
    "loha-effective": (
        "loha", {"r": 2, "alpha": 5, "use_effective_conv2d": True},
        {"hada_t1": (2, 2, 3, 1), "hada_w1_a": (2, 16), "hada_w1_b": (2, 64)},
    ),
    "lokr-full": ("lokr", {"r": 8, "alpha": 3}, {"lokr_w1": (4, 8), "lokr_w2": (4, 8, 3)}),
    "lokr-low-rank-w2": ("lokr", {"r": 1, "alpha": 3}, {"lokr_w2_a": (4, 1), "lokr_w2_b": (1, 24)}),
    "lokr-effective": (
        "lokr", {"r": 2, "alpha": 3, "use_effective_conv2d": True},
        {"lokr_w1": (4, 8), "lokr_t2": (2, 2, 3, 1), "lokr_w2_a": (2, 4), "lokr_w2_b": (2, 8)},
    ),
    "lokr-decompose-both": (
        "lokr", {"r": 2, "decompose_both": True}, {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 8), "lokr_w2_b": (2, 24)},
    ),
    "lokr-decompose-both-effective": (
        "lokr", {"r": 2, "decompose_both": True, "use_effective_conv2d": True},
        {"lokr_w1_a": (4, 2), "lokr_t2": (2, 2, 3, 1)},
    ),
    "lokr-factor-2": ("lokr", {"r": 2, "decompose_factor": 2}, {"lokr_w1": (2, 2), "lokr_w2_b": (2, 96)}),
}
IDS = list(CASES)
# the layout of the grouped conv "2" and of the k=1 conv "4" (effective conv never applies to it)
OTHER_LAYERS = {
    "loha-effective": {"4.hada_w1_a": (6, 2), "4.hada_w1_b": (2, 32), "2.hada_t1": (2, 2, 3, 1), "2.hada_w1_b": (2, 8)},
    "lokr-effective": {"4.lokr_w2_a": (3, 2), "4.lokr_w2_b": (2, 8), "2.lokr_t2": (2, 2, 3, 1), "2.lokr_w2_b": (2, 4)},
    "lokr-full": {"2.lokr_w1": (4, 2), "2.lokr_w2": (8, 4, 3), "4.lokr_w2": (3, 8, 1)},
}
OURS = {"loha": LoHaConfig, "lokr": LoKrConfig}
THEIRS = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}


def _kwargs(case, **extra):
    return {"target_modules": TARGETS, "init_weights": False} | CASES[case][1] | extra


def _ours(case, **extra):
    model = get_adapter_model(_net(), OURS[CASES[case][0]](**_kwargs(case, **extra))).eval()
    _layers.perturb_trainable(model)
    return model


def _theirs(case, **extra):
    model = peft.get_peft_model(_net(), THEIRS[CASES[case][0]](**_kwargs(case, **extra))).eval()
    _layers.perturb_trainable(model)
    return model


def _out(model, x):
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------------------ the file format, both ways


@pytest.mark.parametrize("case", IDS)
def test_saved_tensors_are_peft_keys_and_shapes(case):
    ours = {k: tuple(v.shape) for k, v in _ours(case).get_adapter_state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(_theirs(case)).items()}
    assert ours == theirs
    short = {k.removeprefix("base_model.model."): v for k, v in ours.items()}
    expected = {f"0.{k}": v for k, v in CASES[case][2].items()} | OTHER_LAYERS.get(case, {})
    assert {k: short.get(k) for k in expected} == expected


def test_lokr_full_w2_uses_peft_layout_not_per_tap_kron():
    """PEFT combines a full (out_k, in_n, k) w2 as kron(w1[None], w2) read as (out, in, k);
    loracli must do the same to mean the same file. The per-tap Kronecker product differs."""
    layer = _ours("lokr-full").base_model.get_submodule("0")
    w1, w2, s = layer.lokr_w1["default"], layer.lokr_w2["default"], layer.scaling["default"]
    delta = layer.get_delta_weight("default")
    torch.testing.assert_close(delta, torch.kron(w1[None], w2).reshape(16, 64, 3) * s)
    assert not torch.allclose(delta, torch.kron(w1[:, :, None], w2) * s)


# ------------------------------------------------------------------------------- merging


@pytest.mark.parametrize("case", IDS)
def test_merge_roundtrip_and_merged_weights_match_peft(case, tmp_path):
    ours = _ours(case)
    assert sorted(dict(ours.adapter_layers())) == TARGETS
    _layers.assert_merge_matches_peft(ours, _x(), _net, tmp_path)


# ------------------------------------------------------------------------------- training


def _grads(theirs, ours, x, tmp_path):
    theirs.save_pretrained(tmp_path)
    ours = ours or AdapterModel.from_pretrained(_net(), tmp_path, is_trainable=True)
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(5)
        model(x).square().mean().backward()
    their_grads = {
        re.sub(r"\.default$", "", n): p.grad for n, p in theirs.base_model.model.named_parameters() if p.requires_grad
    }
    our_grads = {
        re.sub(r"\.default$", "", n): p.grad for n, p in ours.base_model.named_parameters() if p.requires_grad
    }
    assert our_grads.keys() == their_grads.keys()
    return our_grads, their_grads


# PEFT draws the module-dropout number in training even at module_dropout 0, loracli only
# above 0: module_dropout > 0 keeps the two random streams aligned for rank dropout
GRADIENT_CASES = [c for c in IDS if c != "loha-effective"] + [
    pytest.param(("loha", {"rank_dropout": 0.3, "module_dropout": 0.2}), id="loha-dropout"),
    pytest.param(("lokr-low-rank-w2", {"rank_dropout": 0.3, "rank_dropout_scale": True, "module_dropout": 0.1}), id="lokr-dropout"),
]


@pytest.mark.parametrize("case", GRADIENT_CASES)
def test_training_gradients_match_peft(case, tmp_path):
    """Same weights, input and dropout draws: every adapter tensor gets PEFT's gradient."""
    case, extra = case if isinstance(case, tuple) else (case, {})
    our_grads, their_grads = _grads(_theirs(case, **extra), None, _x(), tmp_path)
    for key, grad in their_grads.items():
        assert grad is not None and grad.abs().max() > 0, key
        torch.testing.assert_close(our_grads[key], grad, atol=1e-6, rtol=1e-5, msg=key)


def _exact_loha_cp(t1, w1a, w1b, t2, w2a, w2b, scale):
    first = torch.einsum("ijkl,ip,jq->pqkl", t1, w1a, w1b)
    return first * torch.einsum("ijkl,ip,jq->pqkl", t2, w2a, w2b) * scale


def test_loha_effective_conv_gradients_are_autograd_of_peft_forward(tmp_path, monkeypatch):
    """PEFT 0.21's hand-written LoHa Tucker backward gives w1_a and w2_a the gradient built
    from the other factor's core; loracli uses autograd. Its gradients equal PEFT's forward
    differentiated by autograd, and PEFT's own for every other tensor."""
    x = _x()
    ours, peft_grads = _grads(_theirs("loha-effective"), None, x, tmp_path / "peft")
    monkeypatch.setattr(peft.tuners.loha.layer, "make_weight_cp", _exact_loha_cp)
    _, exact = _grads(_theirs("loha-effective"), None, x, tmp_path / "exact")
    for key, grad in exact.items():
        assert grad is not None and grad.abs().max() > 0, key
        torch.testing.assert_close(ours[key], grad, atol=1e-6, rtol=1e-5, msg=key)
        if re.fullmatch(r"[02]\.hada_w[12]_a", key):  # the two convs with Tucker cores
            wrong = (peft_grads[key] - grad).abs().max() > 0.1 * grad.abs().max()
            assert wrong, f"PEFT's {key} gradient is now exact: compare with PEFT directly"
        else:
            torch.testing.assert_close(peft_grads[key], grad, atol=1e-6, rtol=1e-5, msg=key)


def test_lokr_effective_conv_at_rank_1_runs_where_peft_fails(tmp_path):
    """At r=1 PEFT 0.21's LoKr Tucker w2 on a Conv1d has strides torch.kron cannot view, so
    PEFT's forward raises; loracli loads the same file and runs, merges and unmerges exactly."""
    kw = {"r": 1, "use_effective_conv2d": True, "target_modules": ["0"], "init_weights": False}
    theirs = peft.get_peft_model(_net(), peft.LoKrConfig(**kw)).eval()
    _layers.perturb_trainable(theirs)
    x = _x()
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        _out(theirs, x)
    theirs.save_pretrained(tmp_path)
    ours = AdapterModel.from_pretrained(_net(), tmp_path)
    layer = ours.base_model.get_submodule("0")
    assert tuple(layer.lokr_t2["default"].shape) == (1, 1, 3, 1)
    t = {k: v.detach() for k, v in layer.adapter_tensors("default")}
    w2 = torch.einsum("ijk,ip,jq->pqk", t["lokr_t2"][..., 0], t["lokr_w2_a"], t["lokr_w2_b"])
    delta = torch.kron(t["lokr_w1"][:, :, None], w2) * layer.scaling["default"]  # the true per-tap kron
    torch.testing.assert_close(layer.get_delta_weight("default"), delta)
    reference = _net()
    with torch.no_grad():
        reference[0].weight += delta
    expected = _out(reference, x)
    assert (expected - _out(_net(), x)).abs().max() > 20 * ATOL, "the adapter has no effect"
    torch.testing.assert_close(_out(ours, x), expected, atol=ATOL, rtol=0)
    ours.merge_adapter()
    torch.testing.assert_close(_out(ours, x), expected, atol=ATOL, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, _net()[0].weight, atol=ATOL, rtol=0)


@pytest.mark.parametrize("conv", [nn.Conv1d, nn.Conv2d])
@pytest.mark.parametrize("config_cls", [LoHaConfig, LoKrConfig])
def test_reflect_padded_conv_warns_of_peft_difference_and_merges_exactly(conv, config_cls):
    """PEFT zero-pads the LoHa/LoKr delta whatever the base pads with; loracli follows the
    base, so merging stays exact, and says that PEFT's outputs differ."""
    torch.manual_seed(0)
    base = nn.Sequential(conv(4, 6, 3, padding=1, padding_mode="reflect"))
    x = torch.randn(2, 4, 7) if conv is nn.Conv1d else torch.randn(2, 4, 7, 7)
    with pytest.warns(UserWarning, match="padding mode \\('reflect'\\).* different outputs in PEFT"):
        ours = get_adapter_model(base, config_cls(r=2, target_modules=["0"], init_weights=False)).eval()
    unmerged = _out(ours, x)
    with ours.disable_adapter():
        assert (unmerged - _out(ours, x)).abs().max() > 1e-3, "the adapter has no effect"
    ours.merge_adapter()
    torch.testing.assert_close(_out(ours, x), unmerged, atol=ATOL, rtol=0)
