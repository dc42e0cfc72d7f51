"""LoRA-GA (init_lora_weights: lora_ga) against PEFT 0.21's preprocess_loraga + lora_ga_init:
the same gradients, the same A and B, the same rewritten base, on the same batches.

Both tools draw the randomised SVD (and "random"'s permutation) from torch's global RNG,
which they otherwise consume in different orders (PEFT creates A and B between the layers'
inits); ``torch.svd_lowrank`` is therefore re-seeded at every call on both sides.
"""

from __future__ import annotations

import peft
import pytest
import torch
from peft.tuners.lora.loraga import preprocess_loraga

from lora_cli.adapters import AdapterModel, LoraConfig, get_adapter_model
from lora_cli.adapters.methods.lora.lora_ga import estimate_gradients, initialize_lora_ga_weights
from lora_cli.errors import AdapterConfigError, UserInputError
from tests.helpers import tiny_vit

_SVD_LOWRANK = torch.svd_lowrank


@pytest.fixture
def seeded_svd(monkeypatch):
    def svd_lowrank(*args, **kwargs):
        torch.manual_seed(1234)
        return _SVD_LOWRANK(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", svd_lowrank)


def tiny_gpt2_no_dropout():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=99, n_positions=64, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def _vit_batches():
    g = torch.Generator().manual_seed(2)
    return [{"pixel_values": torch.randn(4, 3, 32, 32, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
            for _ in range(3)]


def _gpt2_batches():
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(3):
        ids = torch.randint(2, 99, (2, 8), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


MODELS = {"vit": (tiny_vit, ["q_proj", "v_proj"], _vit_batches), "gpt2": (tiny_gpt2_no_dropout, ["c_attn"], _gpt2_batches)}


def _kw(targets, **ga):
    return {"r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": "lora_ga", "lora_ga_config": ga or None}


def _peft(build, targets, batches, **ga):
    model = build()
    config = peft.LoraConfig(**{**_kw(targets), "lora_ga_config": peft.LoraGAConfig(**ga)})

    def train_step():
        for batch in batches:
            model(**batch).loss.backward()

    preprocess_loraga(model, config, train_step)
    grads = {name: m._peft_loraga_grad.clone() for name, m in model.named_modules() if hasattr(m, "_peft_loraga_grad")}
    return peft.get_peft_model(model, config), grads


@pytest.mark.parametrize(
    ("name", "ga"),
    [
        ("vit", {}),
        ("vit", {"direction": "ArBr", "scale": "weight_svd"}),
        ("vit", {"direction": "A2rBr", "scale": "gd_scale"}),
        ("vit", {"direction": "random", "scale": "unit"}),
        ("gpt2", {"direction": "ArB2r", "scale": "stable", "stable_gamma": 4}),
    ],
    ids=["vit-default", "vit-ArBr-weight_svd", "vit-A2rBr-gd_scale", "vit-random-unit", "gpt2-stable-gamma4"],
)
def test_same_gradients_and_start_as_peft(name, ga, seeded_svd):
    build, targets, make_batches = MODELS[name]
    batches = make_batches()
    theirs, their_grads = _peft(build, targets, batches, **ga)
    ours = get_adapter_model(build(), LoraConfig(**_kw(targets, **ga)))
    grads = estimate_gradients(ours, batches)
    assert sorted(grads) == sorted(their_grads)
    for path, grad in grads.items():
        expected = their_grads[path].T if name == "gpt2" else their_grads[path]  # ours: (out, in)
        torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5, msg=path)
    assert all(p.grad is None for p in ours.parameters())
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in get_adapter_model(build(), LoraConfig(**_kw(targets, **ga))).named_parameters() if p.requires_grad}

    initialize_lora_ga_weights(ours, batches)
    mine = dict(ours.base_model.named_parameters())
    pristine = dict(build().named_parameters())
    compared = moved = 0
    for key, value in theirs.base_model.model.named_parameters():
        if ".base_layer.weight" in key or ".lora_A." in key or ".lora_B." in key:
            torch.testing.assert_close(mine[key.replace(".default.weight", ".default")], value, atol=1e-5, rtol=1e-4, msg=key)
            compared += 1
        if key.endswith(".base_layer.weight"):
            moved += not torch.allclose(value, pristine[key.replace(".base_layer", "")], atol=1e-7)
    assert compared == 3 * moved > 0
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():  # W - s B A + s B A: the model starts where the base was
        torch.testing.assert_close(ours.eval()(**inputs).logits, build()(**inputs).logits, atol=1e-5, rtol=0)


def test_converted_adapter_loads_in_peft_on_the_original_base(tmp_path):
    batches = _vit_batches()
    ours = get_adapter_model(tiny_vit(), LoraConfig(**_kw(["q_proj", "v_proj"])))
    initialize_lora_ga_weights(ours, batches)
    with torch.no_grad():
        for _, layer in ours.adapter_layers():
            layer.lora_A["default"].add_(0.05 * torch.randn_like(layer.lora_A["default"]))  # "trained"
    inputs = {"pixel_values": batches[0]["pixel_values"]}
    ours.eval()
    with torch.no_grad():
        expected = ours(**inputs).logits
    ours.save_pretrained(tmp_path, convert_to_original_base=True)
    theirs = peft.PeftModel.from_pretrained(tiny_vit(), tmp_path).eval()
    back = AdapterModel.from_pretrained(tiny_vit(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(**inputs).logits, expected, atol=1e-5, rtol=0)
    assert theirs.peft_config["default"].r == 8 and theirs.peft_config["default"].init_lora_weights is True


def test_bad_input():
    with pytest.raises(AdapterConfigError, match="direction"):
        LoraConfig(init_lora_weights="lora_ga", lora_ga_config={"direction": "sideways"})
    with pytest.raises(AdapterConfigError, match="only used with init_lora_weights"):
        LoraConfig(lora_ga_config={"scale": "unit"})
    plain = get_adapter_model(tiny_vit(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(UserInputError, match="lora_ga"):
        initialize_lora_ga_weights(plain, _vit_batches())
    model = get_adapter_model(tiny_vit(), LoraConfig(**_kw(["q_proj"])))
    with pytest.raises(UserInputError, match="no loss"):
        initialize_lora_ga_weights(model, [{"pixel_values": torch.randn(2, 3, 32, 32)}])
    with pytest.raises(UserInputError, match="no calibration batch"):
        initialize_lora_ga_weights(model, [])


def test_peft_saved_lora_ga_adapter_loads_as_peft_loads_it(tmp_path, seeded_svd):
    """Without gradients both tools build a lora_ga adapter as a plain LoRA on the untouched
    base and read A and B from the file: the same logits (the converted file is the one that
    reproduces the trained model, see test_converted_adapter_loads_in_peft_on_the_original_base)."""
    batches = _vit_batches()
    theirs, _ = _peft(tiny_vit, ["q_proj", "v_proj"], batches)
    theirs.save_pretrained(tmp_path)
    inputs = {"pixel_values": batches[0]["pixel_values"]}
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(tiny_vit(), tmp_path).eval()(**inputs).logits
        got = AdapterModel.from_pretrained(tiny_vit(), tmp_path)(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - tiny_vit()(**inputs).logits).abs().max() > 1e-4  # the file's non-zero B A is applied
