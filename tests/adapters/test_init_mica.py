"""MiCA (init_lora_weights: mica) against PEFT 0.21: the same start, the same trainable
parameters (B frozen), and adapter files that move both ways with equal logits."""

from __future__ import annotations

import peft
import pytest
import torch

from lora_cli.adapters import AdapterModel, LoraConfig, get_adapter_model
from lora_cli.errors import AdapterConfigError
from tests.helpers import tiny_bert, tiny_gpt2, tiny_vit

CASES = {
    "vit": (tiny_vit, ["q_proj", "v_proj"], lambda: {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}),
    "gpt2": (tiny_gpt2, ["c_attn"], lambda: {"input_ids": torch.randint(2, 99, (2, 8), generator=torch.Generator().manual_seed(1))}),
    "bert-embedding": (tiny_bert, ["query", "word_embeddings"], lambda: {"input_ids": torch.randint(2, 99, (2, 8), generator=torch.Generator().manual_seed(1))}),
}


def _kw(targets):
    return {"r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": "mica"}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _ours_key(key: str) -> str:
    return key.replace(".default.weight", ".default")


@pytest.mark.parametrize("name", list(CASES))
def test_same_start_and_trainable_parameters_as_peft(name):
    build, targets, _ = CASES[name]
    ours = get_adapter_model(build(), LoraConfig(**_kw(targets)))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**_kw(targets)))
    ours_params = dict(ours.base_model.named_parameters())
    compared = 0
    for key, value in theirs.base_model.model.named_parameters():
        if "lora_" in key or "base_layer" in key:
            mine = ours_params[_ours_key(key)]
            torch.testing.assert_close(mine, value, atol=1e-6, rtol=0, msg=key)
            assert mine.requires_grad == value.requires_grad, key
            compared += 1
    assert compared > 0
    b_keys = [k for k in ours_params if ".lora_B." in k or ".lora_embedding_B." in k]
    assert b_keys and all(not ours_params[k].requires_grad for k in b_keys)
    assert all(ours_params[k].abs().sum() > 0 for k in b_keys)  # B is the minor subspace, not zero
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]


def test_b_spans_the_minor_singular_vectors_and_only_a_trains():
    model = get_adapter_model(tiny_vit(), LoraConfig(**_kw(["q_proj"])))
    layer = model.base_model.get_submodule("vit.layers.0.attention.q_proj")
    weight = layer.base_layer.weight.detach()
    u, _, _ = torch.linalg.svd(weight)
    b = layer.lora_B["default"].detach()
    torch.testing.assert_close(b.abs(), u[:, -4:].abs(), atol=1e-5, rtol=0)
    assert torch.count_nonzero(layer.lora_A["default"]) == 0
    model.train()
    inputs = CASES["vit"][2]()
    model(**inputs, labels=torch.tensor([0, 1])).loss.backward()
    assert layer.lora_A["default"].grad is not None and layer.lora_B["default"].grad is None
    model.base_model.requires_grad_(True)  # even a blanket unfreeze leaves B frozen
    assert not layer.lora_B["default"].requires_grad


@pytest.mark.parametrize("name", list(CASES))
def test_files_move_both_ways_with_equal_logits(name, tmp_path):
    build, targets, make_inputs = CASES[name]
    inputs = make_inputs()
    ours = get_adapter_model(build(), LoraConfig(**_kw(targets))).eval()
    with torch.no_grad():
        for _, layer in ours.adapter_layers():
            a = layer.factors("default")[0]
            a.copy_(torch.randn_like(a) * 0.1)  # A trained: a non-zero delta
    expected = _logits(ours, inputs)
    assert (expected - _logits(build(), inputs)).abs().max() > 1e-3
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs, inputs), expected, atol=1e-5, rtol=0)

    theirs.save_pretrained(tmp_path / "theirs")
    back = AdapterModel.from_pretrained(build(), tmp_path / "theirs", is_trainable=True)
    torch.testing.assert_close(_logits(back.eval(), inputs), expected, atol=1e-5, rtol=0)
    frozen = [p for _, layer in back.adapter_layers() for n, p in layer.adapter_tensors("default") if "_B" in n]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_bad_combinations_are_refused():
    with pytest.raises(AdapterConfigError, match="use_dora"):
        LoraConfig(init_lora_weights="mica", use_dora=True)
    with pytest.raises(Exception, match="r <= 32"):
        get_adapter_model(tiny_vit(), LoraConfig(r=40, target_modules=["q_proj"], init_lora_weights="mica"))
