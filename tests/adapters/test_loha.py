"""LoHa: config, parameter shapes and init, dropout, folding forward (PEFT interop both ways: test_interop_table.py)."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from lora_cli.adapters import AdapterModel, LoHaConfig, get_adapter_model
from lora_cli.adapters import functional as fn
from lora_cli.adapters.methods.lycoris.loha import LoHaLayer
from lora_cli.errors import AdapterConfigError
from tests.adapters import _layers
from tests.helpers import tiny_gpt2, tiny_vit

VIT_TARGETS = ["q_proj", "v_proj", "embeddings.patch_embeddings.projection"]
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def Plain() -> nn.Module:  # noqa: N802 - reads like the class it builds
    return _layers.Plain()


def _layer(base: nn.Module, **kw) -> LoHaLayer:
    return _layers.single_layer(LoHaLayer, LoHaConfig, base, **kw)


_shapes = _layers.tensor_shapes


# ----------------------------------------------------------------------------- config


def test_defaults_match_peft():
    ours, theirs = LoHaConfig(), peft.LoHaConfig()
    for name in ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert (LoHaConfig.peft_type, LoHaConfig.method) == ("LOHA", "loha")


def test_problems_are_reported_together():
    with pytest.raises(AdapterConfigError, match="3 problems") as info:
        LoHaConfig(r=0, rank_dropout=1.0, init_weights="gaussian")
    text = str(info.value)
    assert "r: must be an integer >= 1" in text
    assert "rank_dropout: must be a number in [0, 1)" in text
    assert "init_weights: must be true or false" in text
    with pytest.raises(AdapterConfigError, match=r"module_dropout: must be a number in \[0, 1\)"):
        LoHaConfig(module_dropout=-0.1)


def test_vit_base_guide_parameter_counts():
    """The PEFT image-classification guide's LoHa numbers, on vit-base built from its config."""
    from transformers import ViTConfig, ViTForImageClassification

    base = ViTForImageClassification(ViTConfig(num_labels=101))
    base_total = sum(p.numel() for p in base.parameters())
    config = LoHaConfig(
        r=16, alpha=16, target_modules=["query", "value"], module_dropout=0.1, modules_to_save=["classifier"]
    )
    model = get_adapter_model(base, config)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 1_257_317
    adapter = 24 * 4 * 16 * 768  # 12 layers x (query, value) x 4 factors of (768, 16) / (16, 768)
    head_copy = 768 * 101 + 101
    assert trainable == adapter + head_copy
    assert base_total == 85_876_325
    assert total == base_total + trainable == 87_133_642


# --------------------------------------------------------------------- shapes and init


@pytest.mark.parametrize(
    ("base", "kw", "expected"),
    [
        (nn.Linear(12, 20), {}, {"hada_w1_a": (20, 4), "hada_w1_b": (4, 12), "hada_w2_a": (20, 4), "hada_w2_b": (4, 12)}),
        (nn.Conv2d(6, 8, 3), {}, {"hada_w1_a": (8, 4), "hada_w1_b": (4, 54), "hada_w2_a": (8, 4), "hada_w2_b": (4, 54)}),
        (
            nn.Conv2d(6, 8, 3),
            {"use_effective_conv2d": True},
            {
                "hada_w1_a": (4, 8), "hada_w1_b": (4, 6), "hada_w2_a": (4, 8), "hada_w2_b": (4, 6),
                "hada_t1": (4, 4, 3, 3), "hada_t2": (4, 4, 3, 3),
            },
        ),
        (  # 1x1 kernels stay flat even with the effective form
            nn.Conv2d(6, 8, 1),
            {"use_effective_conv2d": True},
            {"hada_w1_a": (8, 4), "hada_w1_b": (4, 6), "hada_w2_a": (8, 4), "hada_w2_b": (4, 6)},
        ),
        (nn.Conv2d(6, 8, 3, groups=2), {}, {"hada_w1_a": (8, 4), "hada_w1_b": (4, 27), "hada_w2_a": (8, 4), "hada_w2_b": (4, 27)}),
    ],
)
def test_shapes_and_zero_init(base, kw, expected):
    layer = _layer(base, r=4, **kw)
    assert _shapes(layer) == expected
    tensors = dict(layer.adapter_tensors("default"))
    assert not tensors["hada_w2_b"].any()
    assert all(p.abs().sum() > 0 for k, p in tensors.items() if k != "hada_w2_b")
    assert not layer.get_delta_weight("default").any()
    assert layer.get_delta_weight("default").shape == base.weight.shape


def test_conv1d_layout_and_random_init():
    gpt2 = tiny_gpt2()
    c_attn = gpt2.transformer.h[0].attn.c_attn  # Conv1D: weight stored (in=32, out=96)
    layer = _layer(c_attn, r=4, init_weights=False)
    assert _shapes(layer)["hada_w1_a"] == (96, 4) and _shapes(layer)["hada_w1_b"] == (4, 32)
    assert layer.get_delta_weight("default").shape == (96, 32)
    x = torch.randn(2, 5, 32)
    expected = c_attn(x) + x @ layer.get_delta_weight("default").T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_delta_formula():
    layer = _layer(nn.Linear(12, 20), r=4, alpha=6, init_weights=False)
    t = dict(layer.adapter_tensors("default"))
    expected = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * 6 / 4
    torch.testing.assert_close(layer.get_delta_weight("default"), expected)
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ expected.T, atol=1e-5, rtol=1e-5)


def test_tucker_delta_matches_explicit_sum():
    r, out, inn, k = 3, 5, 4, 2
    t, wa, wb = torch.randn(r, r, k, k), torch.randn(r, out), torch.randn(r, inn)
    explicit = torch.zeros(out, inn, k, k)
    for i in range(r):
        for j in range(r):
            explicit += wa[i][:, None, None, None] * t[i, j][None, None] * wb[j][None, :, None, None]
    torch.testing.assert_close(fn.tucker_weight(t, wa, wb), explicit, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ dropout


def test_rank_dropout_zeroes_rows_in_training_only():
    layer = _layer(nn.Linear(12, 40), r=4, init_weights=False, rank_dropout=0.5)
    full = layer.get_delta_weight("default")
    layer.train()
    dropped = layer.training_delta("default")
    kept = dropped.abs().sum(dim=1) > 0
    assert 0 < kept.sum() < 40
    scale = 40 / kept.sum()  # LoHa always rescales kept rows by 1 / (fraction kept)
    torch.testing.assert_close(dropped[kept], full[kept] * scale)
    layer.eval()
    torch.testing.assert_close(layer.training_delta("default"), full)


def test_module_dropout_skips_the_adapter_in_training_only():
    layer = _layer(nn.Linear(12, 20), r=4, init_weights=False, module_dropout=0.5)
    x = torch.randn(3, 12)
    _layers.assert_module_dropout_only_in_training(layer, x)


# ------------------------------------------------------------------------ merge/unmerge


@pytest.mark.parametrize(
    ("build", "targets", "kw", "inputs"),
    [
        (tiny_vit, ["q_proj", "v_proj", "embeddings.patch_embeddings.projection"], {}, lambda: {"pixel_values": PIXELS}),
        (tiny_vit, ["embeddings.patch_embeddings.projection"], {"use_effective_conv2d": True, "alpha": 400}, lambda: {"pixel_values": PIXELS}),
        (tiny_gpt2, ["c_attn"], {}, lambda: {"input_ids": torch.arange(12).reshape(2, 6)}),
    ],
    ids=["linear+conv", "effective-conv", "conv1d"],
)
def test_merge_unmerge(build, targets, kw, inputs):
    config = LoHaConfig(**({"r": 4, "alpha": 8, "target_modules": targets, "init_weights": False} | kw))
    model = get_adapter_model(build(), config)
    _layers.assert_merge_roundtrip(model, inputs)


def test_conv1d_save_load_is_exact(tmp_path):
    """PEFT has no LoHa for GPT-2's Conv1D; loracli's own round trip must be exact."""
    ids = torch.arange(12).reshape(2, 6)
    model = get_adapter_model(tiny_gpt2(), LoHaConfig(r=4, target_modules=["c_attn"], init_weights=False))
    model.save_pretrained(tmp_path)
    loaded = AdapterModel.from_pretrained(tiny_gpt2(), tmp_path)
    saved, back = model.get_adapter_state_dict(), loaded.get_adapter_state_dict()
    assert sorted(saved) == sorted(back)
    assert any(k.endswith("c_attn.hada_w1_a") for k in saved)
    assert all(torch.equal(saved[k], back[k]) for k in saved)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
