"""LoHa / LoKr -> LoRA: the reported error is the true one, and PEFT loads the result."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from lora_cli.adapters import (
    AdapterModel,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    get_adapter_model,
    save_as_lora,
)
from lora_cli.adapters.convert import chosen_rank
from lora_cli.errors import UserInputError

TARGETS = ["lin", "conv", "seq"]
CONFIGS = {
    "loha": lambda: LoHaConfig(r=4, alpha=6, target_modules=TARGETS, modules_to_save=["head"]),
    "lokr": lambda: LoKrConfig(r=4, alpha=6, target_modules=TARGETS, modules_to_save=["head"]),
}


class Net(nn.Module):
    """A Linear, a 3x3 Conv2d and a k=3 Conv1d side by side, and a head trained in full."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 12)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.seq = nn.Conv1d(4, 5, 3, padding=1)
        self.head = nn.Linear(12, 3)

    def forward(self, x, img, s):
        return torch.cat([self.head(self.lin(x)), self.conv(img).flatten(1), self.seq(s).flatten(1)], 1)


def _inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(4, 16, generator=g), torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 4, 6, generator=g)


def _source(method: str) -> AdapterModel:
    model = get_adapter_model(Net(), CONFIGS[method]())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.adapter_parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.3)
    return model.eval()


def _true_errors(source: AdapterModel, converted: AdapterModel) -> dict[str, float]:
    theirs = dict(converted.adapter_layers())
    out = {}
    with torch.no_grad():
        for path, layer in source.adapter_layers():
            delta = layer.get_delta_weight("default")
            diff = delta - theirs[path].get_delta_weight("default").reshape(delta.shape)
            out[path] = float(diff.norm() / delta.norm())
    return out


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_full_rank_is_exact_and_loads_in_peft(method, tmp_path):
    source = _source(method)
    report = save_as_lora(source, tmp_path, rank=64)
    assert report.max_error < 1e-5 and {layer.path for layer in report.layers} == set(TARGETS)
    loaded = peft.PeftModel.from_pretrained(Net(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*_inputs()), source(*_inputs()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("choice", [{"rank": 2}, {"energy": 0.9}])
def test_reported_error_is_the_true_error(method, choice, tmp_path):
    source = _source(method)
    report = save_as_lora(source, tmp_path, **choice)
    assert 0 < report.max_error < 1
    ours = AdapterModel.from_pretrained(Net(), tmp_path)
    true = _true_errors(source, ours)
    for layer in report.layers:
        assert layer.relative_error == pytest.approx(true[layer.path], abs=1e-5), layer.path
        if "rank" in choice:
            assert layer.rank == 2
    assert ours.peft_config["default"].peft_type == "LORA"

    loaded = peft.PeftModel.from_pretrained(Net(), tmp_path).eval()
    x, img, s = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, img, s), ours(x, img, s), atol=1e-5, rtol=1e-5)
        # the Linear's output moves by at most ||ΔW - BA||_F ||x||_F = error ||ΔW||_F ||x||_F
        lin = dict(source.adapter_layers())["lin"]
        moved = (loaded.base_model.model.lin(x) - lin(x)).norm()
        bound = report.to_dict()["layers"]["lin"]["relative_error"] * lin.get_delta_weight("default").norm() * x.norm()
        assert 0 < moved <= bound * (1 + 1e-4)
        # the head trained in full is carried over as it was
        torch.testing.assert_close(loaded.base_model.model.head.modules_to_save["default"].weight,
                                   source.base_model.head.modules_to_save["default"].weight)


def test_energy_picks_the_smallest_rank_holding_it():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert [chosen_rank(s, None, e) for e in (0.5, 9 / 14, 0.65, 13 / 14, 0.99, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert chosen_rank(s, 8, None) == 4
    assert chosen_rank(torch.zeros(3), None, 0.9) == 1


def test_bad_choices_are_refused(tmp_path):
    source = _source("loha")
    for kwargs, match in [({}, "exactly one"), ({"rank": 2, "energy": 0.9}, "exactly one"),
                          ({"rank": 0}, "rank must be"), ({"energy": 1.5}, "energy is the fraction")]:
        with pytest.raises(UserInputError, match=match):
            save_as_lora(source, tmp_path, **kwargs)
    lora = get_adapter_model(Net(), LoraConfig(r=2, target_modules=["lin"]))
    with pytest.raises(UserInputError, match="LoRA already"):
        save_as_lora(lora, tmp_path, rank=2)
    assert not any(tmp_path.iterdir())
