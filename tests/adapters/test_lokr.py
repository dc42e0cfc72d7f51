"""LoKr: factorisation cases, init modes, kron_apply forward, dropout (PEFT interop both ways: test_interop_table.py)."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from lora_cli.adapters import AdapterModel, LoKrConfig, get_adapter_model
from lora_cli.adapters import functional as fn
from lora_cli.adapters.methods.lycoris.lokr import LoKrLayer
from lora_cli.errors import AdapterConfigError
from tests.adapters import _layers
from tests.helpers import tiny_gpt2, tiny_vit

VIT_TARGETS = ["q_proj", "v_proj", "embeddings.patch_embeddings.projection"]
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def Plain() -> nn.Module:  # noqa: N802 - reads like the class it builds
    return _layers.Plain(grouped=12, out=20)


def _layer(base: nn.Module, **kw) -> LoKrLayer:
    return _layers.single_layer(LoKrLayer, LoKrConfig, base, **kw)


_shapes = _layers.tensor_shapes


# ----------------------------------------------------------------------------- config


def test_defaults_match_peft():
    ours, theirs = LoKrConfig(), peft.LoKrConfig()
    fields = ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d", "init_weights")
    for name in (*fields, "decompose_both", "decompose_factor", "rank_dropout_scale"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert (LoKrConfig.peft_type, LoKrConfig.method) == ("LOKR", "lokr")


def test_problems_are_reported_together():
    with pytest.raises(AdapterConfigError, match="4 problems") as info:
        LoKrConfig(r=0, decompose_factor=0, init_weights="gaussian", module_dropout=1)
    text = str(info.value)
    assert "r: must be an integer >= 1" in text
    assert "decompose_factor: must be -1 (automatic) or an integer >= 1" in text
    assert "init_weights: must be one of true, false, 'lycoris'" in text
    assert "module_dropout: must be a number in [0, 1)" in text
    assert LoKrConfig(init_weights="lycoris", decompose_factor=4).decompose_factor == 4


def test_vit_base_guide_parameter_counts():
    """The PEFT image-classification guide's LoKr numbers, on vit-base built from its config."""
    from transformers import ViTConfig, ViTForImageClassification

    base = ViTForImageClassification(ViTConfig(num_labels=101))
    base_total = sum(p.numel() for p in base.parameters())
    config = LoKrConfig(
        r=16, alpha=16, target_modules=["query", "value"], module_dropout=0.1, modules_to_save=["classifier"]
    )
    model = get_adapter_model(base, config)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 116_069
    # 768 = 24 x 32: w1 (24, 24); r=16 is not < 32 / 2, so w2 is a full (32, 32)
    adapter = 24 * (24 * 24 + 32 * 32)
    head_copy = 768 * 101 + 101
    assert trainable == adapter + head_copy
    assert base_total == 85_876_325
    assert total == base_total + trainable == 85_992_394


# ----------------------------------------------------------------------- factorisation


@pytest.mark.parametrize(
    ("dim", "factor", "expected"),
    [(768, -1, (24, 32)), (256, -1, (16, 16)), (127, -1, (1, 127)), (12, -1, (3, 4)), (96, -1, (8, 12)),
     (32, 8, (8, 4)), (32, 2, (2, 16)), (32, 3, (2, 16)), (3, 8, (1, 3)), (128, 4, (4, 32))],
)
def test_factorization(dim, factor, expected):
    assert fn.factorization(dim, factor) == expected
    assert peft.tuners.lokr.layer.factorization(dim, factor) == expected


@pytest.mark.parametrize(
    ("base", "kw", "expected"),
    [
        (nn.Linear(32, 32), {"r": 8}, {"lokr_w1": (4, 4), "lokr_w2": (8, 8)}),
        (nn.Linear(32, 32), {"r": 2}, {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}),
        (nn.Linear(32, 32), {"r": 2, "decompose_both": True}, {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}),
        (
            nn.Linear(32, 32),
            {"r": 1, "decompose_both": True},
            {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)},
        ),
        (nn.Linear(32, 32), {"r": 1, "decompose_factor": 8}, {"lokr_w1": (8, 8), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 4)}),
        (nn.Linear(12, 20), {"r": 8}, {"lokr_w1": (4, 3), "lokr_w2": (5, 4)}),
        (nn.Conv2d(6, 8, 3), {"r": 4}, {"lokr_w1": (2, 2), "lokr_w2": (4, 3, 3, 3)}),
        (nn.Conv2d(6, 8, 3), {"r": 1}, {"lokr_w1": (2, 2), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 27)}),
        (
            nn.Conv2d(6, 8, 3),
            {"r": 1, "use_effective_conv2d": True},
            {"lokr_w1": (2, 2), "lokr_t2": (1, 1, 3, 3), "lokr_w2_a": (1, 4), "lokr_w2_b": (1, 3)},
        ),
        (nn.Conv2d(6, 8, 1), {"r": 1, "use_effective_conv2d": True}, {"lokr_w1": (2, 2), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 3)}),
    ],
)
def test_factor_shapes(base, kw, expected):
    layer = _layer(base, init_weights=False, **kw)
    assert _shapes(layer) == expected
    assert layer.get_delta_weight("default").shape == base.weight.shape


def test_delta_formula_and_scale_with_full_factors():
    layer = _layer(nn.Linear(12, 20), r=8, alpha=3, init_weights=False)
    t = dict(layer.adapter_tensors("default"))
    torch.testing.assert_close(layer.get_delta_weight("default"), torch.kron(t["lokr_w1"], t["lokr_w2"]) * 3 / 8)


@pytest.mark.parametrize(
    ("init", "zero"),
    [(True, "lokr_w1"), ("lycoris", "lokr_w2"), (False, None)],
)
@pytest.mark.parametrize("r", [8, 1])
def test_init_modes(init, zero, r):
    layer = _layer(nn.Linear(32, 32), r=r, decompose_both=True, init_weights=init)
    tensors = dict(layer.adapter_tensors("default"))
    if zero is not None and zero not in tensors:  # low rank: the a (w1) or b (w2) half is zero
        zero += "_a" if zero == "lokr_w1" else "_b"
    for key, param in tensors.items():
        assert (param.abs().sum() == 0) == (key == zero), key
    assert bool(layer.get_delta_weight("default").any()) == (init is False)


# ------------------------------------------------------------------- kron_apply forward


@pytest.mark.parametrize(("w1_shape", "w2_shape"), [((4, 3), (5, 4)), ((1, 3), (8, 1)), ((8, 8), (4, 4))])
def test_kron_apply_equals_dense(w1_shape, w2_shape):
    w1, w2 = torch.randn(*w1_shape), torch.randn(*w2_shape)
    x = torch.randn(2, 7, w1_shape[1] * w2_shape[1])
    torch.testing.assert_close(fn.kron_apply(x, w1, w2, 0.5), x @ torch.kron(w1, w2).T * 0.5, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_never_builds_the_delta(monkeypatch, kind):
    base = tiny_gpt2().transformer.h[0].attn.c_attn if kind == "conv1d" else nn.Linear(32, 96)
    layer = _layer(base, r=2, alpha=4, init_weights=False)
    x = torch.randn(2, 5, 32)
    expected = base(x) + x @ layer.get_delta_weight("default").T
    monkeypatch.setattr(fn, "kron_delta", lambda *a, **k: pytest.fail("forward built the full delta"))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ dropout


@pytest.mark.parametrize("rescale", [False, True])
def test_rank_dropout_zeroes_output_rows_in_training_only(rescale):
    layer = _layer(nn.Linear(32, 40), r=2, init_weights=False, rank_dropout=0.5, rank_dropout_scale=rescale)
    x = torch.randn(6, 32)
    full = x @ layer.get_delta_weight("default").T
    layer.train()
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
    kept = delta.abs().sum(dim=0) > 1e-6
    assert 0 < kept.sum() < 40
    scale = 40 / kept.sum() if rescale else 1.0
    torch.testing.assert_close(delta[:, kept], full[:, kept] * scale, atol=1e-5, rtol=1e-5)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - layer.base_layer(x), full, atol=1e-5, rtol=1e-5)


def test_rank_dropout_on_conv_masks_delta_rows():
    layer = _layer(nn.Conv2d(6, 8, 3), r=4, init_weights=False, rank_dropout=0.5)
    full = layer.get_delta_weight("default")
    layer.train()
    dropped = layer.training_delta("default")
    kept = dropped.flatten(1).abs().sum(dim=1) > 0
    torch.testing.assert_close(dropped[kept], full[kept])
    assert not dropped[~kept].any()


def test_module_dropout_skips_the_adapter_in_training_only():
    layer = _layer(nn.Linear(32, 32), r=2, init_weights=False, module_dropout=0.5)
    x = torch.randn(3, 32)
    _layers.assert_module_dropout_only_in_training(layer, x)


# ------------------------------------------------------------------------ merge/unmerge


@pytest.mark.parametrize(
    ("build", "targets", "kw", "inputs"),
    [
        (tiny_vit, VIT_TARGETS, {"r": 8}, lambda: {"pixel_values": PIXELS}),
        (tiny_vit, VIT_TARGETS, {"r": 1, "decompose_both": True}, lambda: {"pixel_values": PIXELS}),
        (tiny_vit, VIT_TARGETS, {"r": 2, "use_effective_conv2d": True}, lambda: {"pixel_values": PIXELS}),
        (tiny_gpt2, ["c_attn"], {"r": 2}, lambda: {"input_ids": torch.arange(12).reshape(2, 6)}),
    ],
    ids=["full", "decompose-both", "effective-conv", "conv1d"],
)
def test_merge_unmerge(build, targets, kw, inputs):
    model = get_adapter_model(build(), LoKrConfig(alpha=8, target_modules=targets, init_weights=False, **kw))
    _layers.assert_merge_roundtrip(model, inputs)


def test_conv1d_save_load_is_exact(tmp_path):
    """PEFT has no LoKr for GPT-2's Conv1D; loracli's own round trip must be exact."""
    ids = torch.arange(12).reshape(2, 6)
    config = LoKrConfig(r=1, decompose_both=True, target_modules=["c_attn"], init_weights=False)
    model = get_adapter_model(tiny_gpt2(), config)
    model.save_pretrained(tmp_path)
    loaded = AdapterModel.from_pretrained(tiny_gpt2(), tmp_path)
    saved, back = model.get_adapter_state_dict(), loaded.get_adapter_state_dict()
    assert sorted(saved) == sorted(back)
    assert any(k.endswith("c_attn.lokr_w1_a") for k in saved)
    assert all(torch.equal(saved[k], back[k]) for k in saved)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
