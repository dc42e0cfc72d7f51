"""AdaLoRA on ``nn.Conv2d``, checked against PEFT 0.21.

PEFT keeps A flattened, (r, in * kh * kw), and runs the update as a conv with the base's
stride, padding and dilation. Every case starts from non-zero adapter weights
(``init_lora_weights=False``: E is random too), so a wrong key, shape or formula shows.
"""

from __future__ import annotations

import re

import peft
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from torch import nn

from lora_cli.adapters import AdapterModel, get_adapter_model
from lora_cli.adapters.methods.adalora.config import AdaLoraConfig
from lora_cli.errors import TargetingError
from tests.adapters import _layers

ATOL = 1e-5
SCHEDULE = dict(init_r=3, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=5, lora_alpha=5)
TARGETS = ["0", "2"]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2, dilation=2, padding=2))


def _x(seed: int = 1):
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def _kw(**extra):
    return SCHEDULE | {"target_modules": TARGETS, "init_lora_weights": False} | extra


def _shrink(model):
    """init_lora_weights=False draws every factor from N(0, 1); a tenth keeps outputs and
    training steps at a scale where float32 tolerances and importance scores mean something."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.mul_(0.1)
    return model


def _out(model, x):
    with torch.no_grad():
        return model(x)


def test_keys_and_shapes_are_peft_s():
    ours = get_adapter_model(_net(), AdaLoraConfig(**_kw()))
    theirs = peft.get_peft_model(_net(), peft.AdaLoraConfig(**_kw()))
    shapes = {k: tuple(v.shape) for k, v in ours.get_adapter_state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in get_peft_model_state_dict(theirs).items()}
    assert shapes["base_model.model.0.lora_A"] == (3, 3 * 3 * 3)


def test_merge_roundtrip_and_merged_weights_match_peft(tmp_path):
    ours = _shrink(get_adapter_model(_net(), AdaLoraConfig(**_kw()))).eval()
    _layers.assert_merge_matches_peft(ours, _x(), _net, tmp_path)


def test_gradients_match_peft_with_dropout(tmp_path):
    theirs = peft.get_peft_model(_net(), peft.AdaLoraConfig(**_kw(lora_dropout=0.2)))
    theirs.save_pretrained(tmp_path)
    ours = AdapterModel.from_pretrained(_net(), tmp_path, is_trainable=True)
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(5)
        model(_x()).square().mean().backward()
    their_grads = {
        re.sub(r"\.default$", "", n): p.grad for n, p in theirs.base_model.model.named_parameters() if p.requires_grad
    }
    our_grads = {re.sub(r"\.default$", "", n): p.grad for n, p in ours.base_model.named_parameters() if p.requires_grad}
    assert our_grads.keys() == their_grads.keys() and len(our_grads) == 6
    for key, grad in their_grads.items():
        assert grad.abs().max() > 0, key
        torch.testing.assert_close(our_grads[key], grad, atol=1e-6, rtol=1e-5, msg=key)


def test_rank_allocation_prunes_conv_ranks_like_peft(tmp_path):
    theirs = _shrink(peft.get_peft_model(_net(), peft.AdaLoraConfig(**_kw())))
    theirs.save_pretrained(tmp_path / "start")
    ours = AdapterModel.from_pretrained(_net(), tmp_path / "start", is_trainable=True)
    patterns = {}
    for name, model, allocate in (
        ("peft", theirs, theirs.base_model.update_and_allocate),
        ("ours", ours, ours.update_and_allocate),
    ):
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for step in range(SCHEDULE["total_step"] + 1):
            model(_x(seed=step)).square().mean().backward()
            optimizer.step()
            allocate(step)
            optimizer.zero_grad()
        patterns[name] = {k.replace(".default", ""): v for k, v in model.peft_config["default"].rank_pattern.items()}
    assert patterns["ours"] == patterns["peft"]
    assert sum(map(sum, patterns["ours"].values())) == SCHEDULE["target_r"] * len(TARGETS)
    x = _x(seed=9)
    torch.testing.assert_close(_out(ours.eval(), x), _out(theirs.eval(), x), atol=ATOL, rtol=0)
    ours.save_pretrained(tmp_path / "pruned")  # tensors sliced to the kept ranks
    reloaded = peft.PeftModel.from_pretrained(_net(), tmp_path / "pruned").eval()
    torch.testing.assert_close(_out(reloaded, x), _out(ours, x), atol=ATOL, rtol=0)


def test_grouped_conv_is_refused_with_the_reason():
    grouped = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2))
    with pytest.raises(TargetingError, match=r"0 \(Conv2d\): AdaLoRA cannot adapt a grouped convolution \(groups=2\)"):
        get_adapter_model(grouped, AdaLoraConfig(**_kw(target_modules=["0"])))
    # PEFT creates it, and then its forward fails
    theirs = peft.get_peft_model(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2)),
                                 peft.AdaLoraConfig(**_kw(target_modules=["0"])))
    with pytest.raises(RuntimeError, match="is invalid for input of size"):
        theirs(torch.randn(1, 4, 5, 5))
