"""add_weighted_adapter: the same tensors and config as PEFT's on the same two adapters."""

from __future__ import annotations

import peft
import pytest
import torch
from peft.utils import get_peft_model_state_dict
from torch import nn

from lora_cli.adapters import AdapterModel, LoKrConfig, LoraConfig, get_adapter_model
from lora_cli.adapters.combine import CombineError
from lora_cli.adapters.merge_math import COMBINATION_TYPES, combine_tensors, drop_random

TARGETS = ["emb", "lin", "conv", "point", "head"]


class Mixed(nn.Module):
    """An embedding, a Linear, a 3x3 and a 1x1 Conv2d: every layout the combination touches."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 12)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.point = nn.Conv2d(6, 8, 1)
        self.head = nn.Linear(12, 7)

    def forward(self, ids, pixels):
        h = self.lin(self.emb(ids)).mean(1)
        c = self.point(torch.relu(self.conv(pixels))).mean((2, 3))
        return self.head(h)[:, :5] + c[:, :5]


def _inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 20, (2, 4), generator=g), torch.randn(2, 3, 6, 6, generator=g)


def _peft_pair(tmp_path, rank_b: int = 4, **extra):
    """A PEFT model holding non-zero adapters "one" (r=4, alpha 8) and "two" (r=rank_b, alpha 6),
    both saved to folders; and our model with the same two adapters loaded from them."""
    theirs = peft.get_peft_model(Mixed(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                          init_lora_weights=False, **extra), adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(r=rank_b, lora_alpha=6, target_modules=TARGETS,
                                            init_lora_weights=False, **extra))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in sorted(theirs.named_parameters()):
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.3)
    theirs.save_pretrained(tmp_path)  # at tmp_path/one and tmp_path/two
    ours = AdapterModel.from_pretrained(Mixed(), tmp_path / "one", adapter_name="one")
    ours.load_adapter(tmp_path / "two", "two")
    return theirs, ours


def _assert_same(theirs, ours, name="ab", atol=1e-5):
    expected = get_peft_model_state_dict(theirs, adapter_name=name)
    got = ours.get_adapter_state_dict(name)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert value.abs().max() > 0, key
        torch.testing.assert_close(got[key], value, atol=atol, rtol=1e-4, msg=key)
    c_theirs, c_ours = theirs.peft_config[name], ours.peft_config[name]
    assert (c_ours.r, c_ours.lora_alpha) == (c_theirs.r, c_theirs.lora_alpha)
    assert sorted(c_ours.target_modules) == sorted(c_theirs.target_modules)


@pytest.mark.parametrize("kind", COMBINATION_TYPES)
def test_every_combination_matches_peft(kind, tmp_path, monkeypatch):
    theirs, ours = _peft_pair(tmp_path)
    real = torch.bernoulli
    for model in (theirs, ours):  # DARE: both drop with the same masks from a fresh seeded generator
        g = torch.Generator().manual_seed(11)
        monkeypatch.setattr(torch, "bernoulli", lambda p, g=g: real(p, generator=g))
        model.add_weighted_adapter(["one", "two"], [0.7, -0.4], "ab", combination_type=kind, density=0.5)
    _assert_same(theirs, ours)
    ours.set_adapter("ab")
    theirs.set_adapter("ab")
    with torch.no_grad():
        torch.testing.assert_close(ours(*_inputs()), theirs(*_inputs()), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["cat", "svd", "ties_svd", "magnitude_prune_svd"])
def test_different_ranks_match_peft(kind, tmp_path):
    theirs, ours = _peft_pair(tmp_path, rank_b=6)
    for model in (theirs, ours):
        model.add_weighted_adapter(["one", "two"], [1.0, 0.5], "ab", combination_type=kind, density=0.6)
    _assert_same(theirs, ours)
    assert ours.peft_config["ab"].r == (10 if kind == "cat" else 6)


@pytest.mark.parametrize("options", [
    {"svd_rank": 3}, {"svd_clamp": 0.9}, {"svd_full_matrices": False}, {"svd_rank": 2, "svd_clamp": 0.5},
])
def test_svd_options_match_peft(options, tmp_path):
    theirs, ours = _peft_pair(tmp_path)
    for model in (theirs, ours):
        model.add_weighted_adapter(["one", "two"], [0.6, 0.4], "ab", combination_type="svd", **options)
    _assert_same(theirs, ours)


@pytest.mark.parametrize("kind", ["ties", "dare_ties_svd"])
def test_frequency_sign_election_matches_peft(kind, tmp_path, monkeypatch):
    theirs, ours = _peft_pair(tmp_path)
    real = torch.bernoulli
    for model in (theirs, ours):
        g = torch.Generator().manual_seed(4)
        monkeypatch.setattr(torch, "bernoulli", lambda p, g=g: real(p, generator=g))
        model.add_weighted_adapter(["one", "two"], [0.5, 0.5], "ab", combination_type=kind, density=0.3,
                                   majority_sign_method="frequency")
    _assert_same(theirs, ours)


def test_cat_is_exact_and_single_adapter_is_linear(tmp_path):
    theirs, ours = _peft_pair(tmp_path, rank_b=6)
    ours.add_weighted_adapter(["one", "two"], [0.7, -0.3], "cat", combination_type="cat")
    ours.add_weighted_adapter(["two"], [2.0], "twice", combination_type="ties")  # one adapter: linear
    with torch.no_grad():
        for path, layer in ours.adapter_layers():
            one, two = layer.get_delta_weight("one"), layer.get_delta_weight("two")
            torch.testing.assert_close(layer.get_delta_weight("cat"), 0.7 * one - 0.3 * two, msg=path)
            torch.testing.assert_close(layer.get_delta_weight("twice"), 2.0 * two, msg=path)
    theirs.add_weighted_adapter(["two"], [2.0], "twice", combination_type="ties")
    _assert_same(theirs, ours, "twice")


def test_svd_rank_above_a_layer_size_pads_with_zeros(tmp_path):
    _, ours = _peft_pair(tmp_path)
    ours.add_weighted_adapter(["one", "two"], [0.5, 0.5], "big", combination_type="svd", svd_rank=16)
    with torch.no_grad():
        for path, layer in ours.adapter_layers():
            expected = 0.5 * layer.get_delta_weight("one") + 0.5 * layer.get_delta_weight("two")
            torch.testing.assert_close(layer.get_delta_weight("big"), expected, atol=1e-5, rtol=1e-4, msg=path)


def test_saved_combination_loads_in_peft(tmp_path):
    theirs, ours = _peft_pair(tmp_path / "src")
    ours.add_weighted_adapter(["one", "two"], [0.7, 0.3], "ab", combination_type="svd")
    ours.save_pretrained(tmp_path / "out", selected_adapters=["ab"])
    loaded = peft.PeftModel.from_pretrained(Mixed(), tmp_path / "out" / "ab").eval()
    ours.set_adapter("ab")
    with torch.no_grad():
        torch.testing.assert_close(loaded(*_inputs()), ours(*_inputs()), atol=1e-5, rtol=1e-4)


def test_dare_keeps_density_and_the_mean():
    torch.manual_seed(0)
    t = torch.randn(400, 400) + 1.0
    dropped = drop_random(t, 0.3)
    kept = (dropped != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.01
    assert abs(dropped.mean().item() - t.mean().item()) < 0.05  # rescaled by 1 / density: unbiased
    mixed = combine_tensors("dare_linear", [t, -t], [0.5, 0.5], density=0.5)
    assert abs(mixed.mean().item()) < 0.05 and mixed.abs().max() > 0


def test_bad_inputs_are_refused_and_leave_the_model_unchanged(tmp_path):
    _, ours = _peft_pair(tmp_path, rank_b=6)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    cases = [
        (dict(adapters=["one", "x"], weights=[1, 1]), "no adapter named 'x'"),
        (dict(adapters=["one", "two"], weights=[1]), "one weight per adapter"),
        (dict(adapters=["one", "two"], weights=[1, 1], combination_type="linear"), "same rank"),
        (dict(adapters=["one", "two"], weights=[1, 1], combination_type="ties_svd"), "needs density"),
        (dict(adapters=["one", "two"], weights=[1, 1], combination_type="mean"), "is unknown"),
        (dict(adapters=["one", "two"], weights=[1, float("nan")]), "finite"),
        (dict(adapters=["one", "two"], weights=[1, 1], adapter_name="one"), "already exists"),
        (dict(adapters=["one", "two"], weights=[1, 1], svd_clamp=2), "quantile"),
        (dict(adapters=["one", "two"], weights=[1, 1], majority_sign_method="most"), "majority_sign_method"),
    ]
    for kwargs, match in cases:
        kwargs.setdefault("adapter_name", "ab")
        with pytest.raises(CombineError, match=match):
            ours.add_weighted_adapter(**kwargs)
    assert sorted(ours.peft_config) == ["one", "two"]
    after = ours.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_only_lora_combines():
    model = get_adapter_model(Mixed(), LoKrConfig(r=2, alpha=2, target_modules=["lin"]), "one")
    model.add_adapter("two", LoKrConfig(r=2, alpha=2, target_modules=["lin"]))
    with pytest.raises(CombineError, match="only LoRA adapters can be combined"):
        model.add_weighted_adapter(["one", "two"], [1, 1], "ab")
    dora = get_adapter_model(Mixed(), LoraConfig(r=2, target_modules=["lin"], use_dora=True), "one")
    dora.add_adapter("two", LoraConfig(r=2, target_modules=["lin"], use_dora=True))
    with pytest.raises(CombineError, match="DoRA"):
        dora.add_weighted_adapter(["one", "two"], [1, 1], "ab")


def test_heads_are_refused_as_in_peft_or_averaged_on_request():
    model = get_adapter_model(Mixed(), LoraConfig(r=2, target_modules=["lin"], modules_to_save=["head"]), "one")
    model.add_adapter("two", LoraConfig(r=2, target_modules=["lin"], modules_to_save=["head"]))
    with torch.no_grad():
        heads = model.base_model.head.modules_to_save
        heads["one"].weight.fill_(1.0)
        heads["two"].weight.fill_(3.0)
    with pytest.raises(CombineError, match="combine_modules_to_save=True"):
        model.add_weighted_adapter(["one", "two"], [0.75, 0.25], "ab", combination_type="linear")
    model.add_weighted_adapter(["one", "two"], [1.5, 0.5], "ab", combination_type="linear", combine_modules_to_save=True)
    torch.testing.assert_close(heads["ab"].weight, torch.full_like(heads["ab"].weight, 1.5))  # (1.5*1 + 0.5*3) / 2
    assert model.peft_config["ab"].modules_to_save == ["head"]
