"""Where loracli differs from PEFT 0.21 on purpose (README, "Where loracli differs from PEFT").

Each test pins loracli's behaviour, the mathematically consistent one, and shows PEFT's
differs: if a PEFT release changes, the PEFT half fails and README's section needs updating.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from lora_cli.adapters import AdapterModel, LoraConfig, get_adapter_model

peft = pytest.importorskip("peft")

PEFT_CHANGED = "PEFT's behaviour changed: update README's 'Where loracli differs from PEFT' and this test"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 12)

    def forward(self, x):
        return self.lin(x)


def _delta(model, name: str) -> torch.Tensor:
    base = model.base_model
    return getattr(base, "model", base).lin.get_delta_weight(name).detach()


def _rslora_pair(tmp_path):
    """Two non-zero rsLoRA adapters (r=4, alpha 8 and 6) in PEFT, and the same files in loracli."""
    kw = {"r": 4, "target_modules": ["lin"], "init_lora_weights": False, "use_rslora": True}
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(lora_alpha=8, **kw), adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(lora_alpha=6, **kw))
    theirs.save_pretrained(tmp_path)
    ours = AdapterModel.from_pretrained(Net(), tmp_path / "one", adapter_name="one")
    ours.load_adapter(tmp_path / "two", "two")
    return theirs, ours


@pytest.mark.parametrize(("kind", "weights", "options"), [
    ("linear", [1.0], {}),  # one adapter: the combination is that adapter
    ("cat", [0.7, 0.3], {}),  # exact by construction
    ("svd", [0.7, 0.3], {"svd_rank": 8}),  # full rank: exact
])
def test_combined_rslora_adapters_hold_the_weighted_sum_where_peft_scales_it_by_sqrt_r(kind, weights, options,
                                                                                       tmp_path):
    """The new adapter's factors already carry the sources' scales, so its own scale must be 1.
    With rsLoRA that needs lora_alpha = sqrt(r); PEFT 0.21 writes lora_alpha = r, so its
    combination is sqrt(r) times too large (2 and 2.83 here)."""
    theirs, ours = _rslora_pair(tmp_path)
    names = ["one", "two"][:len(weights)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_weighted_adapter(names, weights, "ab", combination_type=kind, **options)
    ours.add_weighted_adapter(names, weights, "ab", combination_type=kind, **options)
    expected = sum(w * _delta(ours, n) for n, w in zip(names, weights, strict=True))
    assert expected.abs().max() > 0.1

    config = ours.peft_config["ab"]
    assert config.use_rslora and config.lora_alpha == pytest.approx(math.sqrt(config.r))
    torch.testing.assert_close(_delta(ours, "ab"), expected, atol=1e-5, rtol=0)

    r = theirs.peft_config["ab"].r
    assert theirs.peft_config["ab"].lora_alpha == r, PEFT_CHANGED
    torch.testing.assert_close(_delta(theirs, "ab"), math.sqrt(r) * expected, atol=1e-5, rtol=1e-5,
                               msg=PEFT_CHANGED)


def test_unload_after_merge_adapter_gives_the_original_base_where_peft_keeps_the_merge():
    """unload() is "the base model without the adapters": a merged adapter is taken out first.
    PEFT 0.21 removes the wrappers and leaves the merged delta in the weights."""
    pristine = Net().lin.weight.detach().clone()
    kw = {"target_modules": ["lin"], "init_lora_weights": False}
    ours = get_adapter_model(Net(), LoraConfig(**kw))
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(**kw))
    theirs_delta = _delta(theirs, "default")
    assert _delta(ours, "default").abs().max() > 0.1 and theirs_delta.abs().max() > 0.1
    ours.merge_adapter()
    theirs.merge_adapter()

    plain = ours.unload()
    assert type(plain.lin) is nn.Linear
    torch.testing.assert_close(plain.lin.weight.detach(), pristine, atol=1e-6, rtol=0)

    kept = theirs.unload()
    torch.testing.assert_close(kept.lin.weight.detach(), pristine + theirs_delta, atol=1e-6, rtol=0,
                               msg=PEFT_CHANGED)
