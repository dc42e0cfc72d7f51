"""LoRA against PEFT (the oracle) beyond the plain file round trip, which
test_interop_table.py checks: base-rewriting starts, transformers-4 module names, gradients.

Adapter weights start non-zero (``init_lora_weights=False``) and every trainable tensor
(adapter, DoRA magnitude, biases, modules_to_save copies) is perturbed, so a key that is
dropped or misnamed on either side changes the logits.
"""

from __future__ import annotations

import json
import re

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_cli.adapters import AdapterModel, LoraConfig, get_adapter_model
from tests.adapters import _layers
from tests.helpers import tiny_bert, tiny_gpt2, tiny_opt, tiny_vit

ATOL = 1e-5


def _vit_inputs():
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def _ids_inputs():
    return {"input_ids": torch.randint(2, 99, (2, 8), generator=torch.Generator().manual_seed(1))}


MODELS = {
    "vit": (tiny_vit, _vit_inputs),
    "gpt2": (tiny_gpt2, _ids_inputs),
    "bert": (tiny_bert, _ids_inputs),
    "opt": (tiny_opt, _ids_inputs),
}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _kwargs(kw):
    return {"r": 4, "lora_alpha": 8, "init_lora_weights": False} | kw


@pytest.mark.parametrize(
    ("name", "targets", "init"),
    [("vit", ["q_proj", "v_proj"], "pissa"), ("gpt2", ["c_attn"], "pissa"), ("opt", ["q_proj"], "olora")],
)
def test_base_rewriting_inits_match_peft(name, targets, init):
    """PiSSA / OLoRA rewrite W <- W - s B A: both tools must produce the same W, A and B."""
    build = MODELS[name][0]
    kw = {"r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": init}
    ours = get_adapter_model(build(), LoraConfig(**kw))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**kw))
    ours_state = dict(ours.base_model.named_parameters())
    pristine = dict(build().named_parameters())
    compared = moved = 0
    for key, value in theirs.base_model.model.named_parameters():
        if ".base_layer.weight" in key or ".lora_A." in key or ".lora_B." in key:
            ours_key = key.replace(".default.weight", ".default")  # ours holds A, B as bare parameters
            torch.testing.assert_close(ours_state[ours_key], value, atol=1e-5, rtol=0, msg=key)
            compared += 1
        if key.endswith(".base_layer.weight"):
            moved += not torch.allclose(value, pristine[key.replace(".base_layer", "")], atol=1e-3)
    assert compared == 3 * moved > 0


V5_TO_V4_VIT = {
    "vit.layers.": "vit.encoder.layer.",
    ".attention.q_proj.": ".attention.attention.query.",
    ".attention.v_proj.": ".attention.attention.value.",
}


def test_peft_adapter_with_transformers4_names_loads(tmp_path):
    """An adapter written for transformers 4 (old ViT module names) gives the same logits."""
    inputs = _vit_inputs()
    theirs = peft.get_peft_model(
        tiny_vit(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    _layers.perturb_trainable(theirs)
    expected = _logits(theirs, inputs)
    theirs.save_pretrained(tmp_path)

    state = load_file(tmp_path / "adapter_model.safetensors")
    old_state = {}
    for key, tensor in state.items():
        for new, old in V5_TO_V4_VIT.items():
            key = key.replace(new, old)
        old_state[key] = tensor
    assert "base_model.model.vit.encoder.layer.0.attention.attention.query.lora_A.weight" in old_state
    save_file(old_state, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] = ["query", "value"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    ours = AdapterModel.from_pretrained(tiny_vit(), tmp_path)
    assert len(ours.targets["default"]) == 4
    torch.testing.assert_close(_logits(ours, inputs), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("name", "kw"),
    [
        ("vit", {"target_modules": ["q_proj", "v_proj"], "use_dora": True}),
        ("gpt2", {"target_modules": ["c_attn"], "use_dora": True, "use_rslora": True}),
        ("bert", {"target_modules": ["query", "word_embeddings"], "bias": "all", "modules_to_save": ["classifier"]}),
        ("vit", {"target_modules": ["q_proj", "projection"], "lora_bias": True}),
    ],
    ids=["vit-dora", "gpt2-dora-rslora", "bert-embedding-bias-head", "vit-lora_bias"],
)
def test_training_gradients_match_peft(name, kw, tmp_path):
    """Same weights, same batch, same dropout draws: every trainable tensor gets PEFT's gradient."""
    build, make_inputs = MODELS[name]
    inputs = make_inputs()
    inputs["labels"] = inputs["input_ids"] if name == "gpt2" else torch.tensor([0, 1])
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**_kwargs(kw)))
    _layers.perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path)
    ours = AdapterModel.from_pretrained(build(), tmp_path, is_trainable=True)
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(5)
        model(**inputs).loss.backward()
    their_grads = {
        re.sub(r"\.lora_B\.default\.bias$", ".lora_B_bias.default", re.sub(r"(\.lora_\w+\.default)\.weight$", r"\1", n)): p.grad
        for n, p in theirs.base_model.model.named_parameters() if p.requires_grad
    }
    our_grads = {n: p.grad for n, p in ours.base_model.named_parameters() if p.requires_grad}
    assert our_grads.keys() == their_grads.keys()
    for key, grad in their_grads.items():
        assert grad is not None and grad.abs().max() > 0, key
        torch.testing.assert_close(our_grads[key], grad, atol=1e-6, rtol=1e-5, msg=key)
