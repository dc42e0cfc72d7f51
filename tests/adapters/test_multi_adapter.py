"""Several adapters active at once, and mixed-adapter batches, against PEFT (the oracle).

Adapter weights start non-zero (``init_lora_weights=False``) and are perturbed, then moved
to PEFT through the adapter files, so both tools run the same tensors.
"""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from lora_cli.adapters import LoHaConfig, LoraConfig, get_adapter_model
from lora_cli.adapters.methods.adalora.config import AdaLoraConfig
from lora_cli.errors import UserInputError
from tests.adapters import _layers
from tests.helpers import tiny_bert

ATOL = 1e-5


class Tokens(nn.Module):
    """Embedding -> Conv1d -> Linear -> head, over token ids (batch, seq)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.conv(self.emb(x).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.relu(self.lin(h)))


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x)[0]


def _tokens():
    return torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(1))


def _images():
    return torch.randn(4, 4, 6, 6, generator=torch.Generator().manual_seed(1))


NETS = {  # name: (base, input, targets)
    "tokens": (Tokens, _tokens, ["emb", "conv", "lin"]),
    "conv2d": (_layers.Plain, _images, ["conv", "point", "lin"]),
}


def _pair(net: str, tmp_path, names=("default", "b"), **kw):
    """Ours with adapters ``names`` (different ranks, perturbed) and PEFT's with the same files."""
    build, _, targets = NETS[net]
    ours = get_adapter_model(build(), LoraConfig(target_modules=targets, init_lora_weights=False, **kw))
    for i, name in enumerate(names[1:]):
        ours.add_adapter(name, LoraConfig(r=4 + 2 * i, lora_alpha=6, target_modules=targets, init_lora_weights=False, **kw))
    ours.set_adapter(list(names))
    _layers.perturb_trainable(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path, is_trainable=True)
    for name in names[1:]:
        theirs.load_adapter(tmp_path / name, name, is_trainable=True)
    return ours, theirs


def _key(name: str) -> str:
    """A parameter name in one spelling for both tools."""
    name = name.removeprefix("base_model.model.").removeprefix("base_model.")
    return name.removesuffix(".weight") if ".lora_" in name else name


def _grads(model) -> dict[str, torch.Tensor]:
    return {_key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


def _trainable(model) -> set[str]:
    return {_key(n) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("net", sorted(NETS))
def test_several_active_sum_their_deltas_and_train_as_in_peft(net, tmp_path):
    ours, theirs = _pair(net, tmp_path)
    theirs.base_model.set_adapter(["default", "b"])
    assert ours.active_adapters == ["default", "b"] == theirs.active_adapters
    x = NETS[net][1]()
    out, ref = ours(x), theirs(x)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    with torch.no_grad():
        ours.set_adapter("default")
        assert (ours(x) - out).abs().max() > 1e-3  # b contributes
        ours.set_adapter(["default", "b"])
    assert _trainable(ours) == _trainable(theirs)
    assert any(".b" in k for k in _trainable(ours)) and any(".default" in k for k in _trainable(ours))
    out.square().sum().backward()
    ref.square().sum().backward()
    ours_g, theirs_g = _grads(ours), _grads(theirs)
    assert ours_g.keys() == theirs_g.keys()
    for key, grad in ours_g.items():
        torch.testing.assert_close(grad, theirs_g[key], atol=ATOL, rtol=1e-4, msg=key)


def test_only_the_listed_adapters_train_as_in_peft(tmp_path):
    ours, theirs = _pair("tokens", tmp_path, names=("default", "b", "c"))
    ours.set_adapter(["b", "c"])
    theirs.base_model.set_adapter(["b", "c"])
    assert _trainable(ours) == _trainable(theirs)
    assert not any(".default" in k for k in _trainable(ours))
    assert ours.active_adapter == "b"


def test_merge_with_several_active_matches_peft(tmp_path):
    ours, theirs = _pair("tokens", tmp_path)
    theirs.base_model.set_adapter(["default", "b"])
    x = _tokens()
    with torch.no_grad():
        unmerged = ours(x)
        ours.merge_adapter()
        theirs.merge_adapter()
        assert ours.base_model.lin.merged_adapters == ["default", "b"]
        torch.testing.assert_close(ours(x), unmerged, atol=ATOL, rtol=ATOL)
        for path in ("emb", "conv", "lin"):
            torch.testing.assert_close(
                ours.base_model.get_submodule(path).base_layer.weight,
                theirs.base_model.model.get_submodule(path).base_layer.weight, atol=ATOL, rtol=ATOL,
            )
        ours.unmerge_adapter()
        torch.testing.assert_close(ours(x), unmerged, atol=ATOL, rtol=ATOL)
        ours.merge_adapter()
        with pytest.warns(UserWarning, match="unmerges"):
            ours.set_adapter("default")  # b must leave the weights
        assert not ours.base_model.lin.merged
        ours.set_adapter(["default", "b"])
        plain = ours.merge_and_unload()(x)
        torch.testing.assert_close(plain, unmerged, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(plain, theirs.merge_and_unload()(x), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("net", sorted(NETS))
def test_mixed_batch_rows_match_peft(net, tmp_path):
    ours, theirs = _pair(net, tmp_path)
    ours.set_adapter("default")  # a mixed batch ignores which adapters are active, as PEFT does
    for param in ours.adapter_parameters("b"):  # b trains in PEFT's copy (loaded trainable)
        param.requires_grad_(True)
    ours.eval()
    theirs.eval()
    x = NETS[net][1]()
    rows = ["default", "b", "__base__", "b"]
    out = ours(x, adapter_names=rows)
    ref = theirs(x, adapter_names=rows)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
    with torch.no_grad(), ours.disable_adapter():
        torch.testing.assert_close(out[2], ours(x)[2])
    out.square().sum().backward()
    ref.square().sum().backward()
    ours_g, theirs_g = _grads(ours), _grads(theirs)
    assert ours_g.keys() == theirs_g.keys()
    for key, grad in ours_g.items():
        torch.testing.assert_close(grad, theirs_g[key], atol=ATOL, rtol=1e-4, msg=key)
    with torch.no_grad():
        ours.set_adapter("b")
        torch.testing.assert_close(out[1::2], ours(x)[1::2], atol=ATOL, rtol=ATOL)


def test_mixed_batch_with_modules_to_save_and_lora_bias_matches_peft(tmp_path):
    base = tiny_bert
    cfg = {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "init_lora_weights": False}
    ours = get_adapter_model(base(), LoraConfig(**cfg))
    ours.add_adapter("b", LoraConfig(r=4, lora_bias=True, **cfg))
    ours.set_adapter("b")
    _layers.perturb_trainable(ours)
    ours.set_adapter("default")
    _layers.perturb_trainable(ours)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(base(), tmp_path)
    theirs.load_adapter(tmp_path / "b", "b")
    ours.eval()
    ids = torch.randint(2, 99, (3, 8), generator=torch.Generator().manual_seed(1))
    rows = ["b", "__base__", "default"]
    with torch.no_grad():
        out = ours(input_ids=ids, adapter_names=rows).logits
        ref = theirs(input_ids=ids, adapter_names=rows).logits
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=ATOL)
        ours.set_adapter("b")
        torch.testing.assert_close(out[0], ours(input_ids=ids).logits[0], atol=ATOL, rtol=ATOL)


def test_mixed_batch_refusals(tmp_path):
    ours, _ = _pair("tokens", tmp_path)
    x = _tokens()
    ours.train()
    with pytest.raises(UserInputError, match="training"):
        ours(x, adapter_names=["default"] * 4)
    ours.eval()
    with pytest.raises(UserInputError, match="unknown adapter"):
        ours(x, adapter_names=["default", "zz", "__base__", "b"])
    with pytest.raises(UserInputError, match="one per row"):
        ours(x, adapter_names=["default", "b"])
    with pytest.raises(UserInputError, match="list of adapter names"):
        ours(x, adapter_names="default")
    ours.merge_adapter()
    with pytest.raises(UserInputError, match="merged"):
        ours(x, adapter_names=["default"] * 4)
    ours.unmerge_adapter()
    assert all(layer.batch_adapters is None for _, layer in ours.adapter_layers())


@pytest.mark.parametrize(
    ("build", "config", "x", "match"),
    [
        (Tokens, LoraConfig(target_modules=["lin"], use_dora=True), _tokens, "DoRA"),
        (Attn, LoraConfig(target_modules=["mha"]), lambda: torch.randn(4, 5, 8), "MultiheadAttention"),
        (Tokens, LoHaConfig(target_modules=["lin"]), _tokens, "only LoRA layers"),
        (Tokens, AdaLoraConfig(target_modules=["lin"], total_step=10), _tokens, "only LoRA layers"),
    ],
    ids=["dora", "mha", "loha", "adalora"],
)
def test_mixed_batch_refused_where_peft_has_none(build, config, x, match):
    model = get_adapter_model(build(), config).eval()
    with pytest.raises(UserInputError, match=match):
        model(x(), adapter_names=["default"] * 4)


def test_set_adapter_refusals():
    cfg = {"target_modules": ["lin"], "modules_to_save": ["head"]}
    model = get_adapter_model(Tokens(), LoraConfig(**cfg))
    model.add_adapter("b", LoraConfig(**cfg))
    with pytest.raises(UserInputError, match="head"):  # PEFT: one modules_to_save copy at a time
        model.set_adapter(["default", "b"])
    assert model.active_adapters == ["default"]
    with pytest.raises(UserInputError, match="no adapter named 'zz'"):
        model.set_adapter(["default", "zz"])
    with pytest.raises(UserInputError, match="at least one"):
        model.set_adapter([])
    ada = get_adapter_model(Tokens(), AdaLoraConfig(target_modules=["lin"], total_step=10))
    ada.add_adapter("b", AdaLoraConfig(target_modules=["lin"], total_step=10, inference_mode=True))
    with pytest.raises(UserInputError, match="one at a time"):
        ada.set_adapter(["default", "b"])


def test_deleting_an_active_adapter_keeps_the_others(tmp_path):
    ours, _ = _pair("tokens", tmp_path, names=("default", "b", "c"))
    ours.delete_adapter("b")
    assert ours.active_adapters == ["default", "c"]
    assert ours.base_model.lin.active_adapters == ["default", "c"]


@pytest.mark.parametrize("net", sorted(NETS))
def test_merging_two_active_dora_adapters_keeps_the_unmerged_output_as_peft(net, tmp_path):
    """Each DoRA adapter's rescaling g = m / ||W + dW|| is taken against the unmerged base W (as the
    unmerged forward takes it), not against a weight that already holds the adapter merged before it."""
    ours, theirs = _pair(net, tmp_path, use_dora=True)
    theirs.base_model.set_adapter(["default", "b"])
    x = NETS[net][1]()
    with torch.no_grad():
        unmerged = ours(x)
        torch.testing.assert_close(unmerged, theirs(x), atol=ATOL, rtol=ATOL)
        ours.set_adapter("default")
        assert (ours(x) - unmerged).abs().max() > 1e-2  # b contributes
        ours.set_adapter(["default", "b"])
        ours.merge_adapter()
        theirs.merge_adapter()
        assert all(layer.merged_adapters == ["default", "b"] for _, layer in ours.adapter_layers())
        torch.testing.assert_close(ours(x), unmerged, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(x), theirs(x), atol=ATOL, rtol=0)
        for path in NETS[net][2]:
            torch.testing.assert_close(ours.base_model.get_submodule(path).base_layer.weight,
                                       theirs.base_model.model.get_submodule(path).base_layer.weight,
                                       atol=ATOL, rtol=0)
        ours.unmerge_adapter()  # newest first, each against the unmerged base: the base comes back
        with ours.disable_adapter():
            torch.testing.assert_close(ours(x), NETS[net][0]()(x), atol=ATOL, rtol=0)
        torch.testing.assert_close(ours(x), unmerged, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.merge_and_unload()(x), unmerged, atol=ATOL, rtol=0)


def test_dora_beside_a_merged_lora_adapter_runs_against_the_unmerged_base(tmp_path):
    """A LoRA adapter merged, a DoRA adapter active unmerged: the DoRA adapter still rescales the
    unmerged base, so merging it too changes nothing and the pair gives the both-unmerged output."""
    build, make_x, targets = NETS["tokens"]
    model = get_adapter_model(build(), LoraConfig(target_modules=targets, init_lora_weights=False))
    model.add_adapter("d", LoraConfig(r=4, target_modules=targets, init_lora_weights=False, use_dora=True))
    model.set_adapter(["default", "d"])
    _layers.perturb_trainable(model)
    x = make_x()
    with torch.no_grad():
        both = model(x)
        model.merge_adapter(["default"])
        torch.testing.assert_close(model(x), both, atol=ATOL, rtol=0)
        model.merge_adapter(["d"])
        torch.testing.assert_close(model(x), both, atol=ATOL, rtol=0)
        model.unmerge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(model(x), build()(x), atol=ATOL, rtol=0)
