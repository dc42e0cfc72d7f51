"""AdapterModel.from_pretrained(adapter_dir) with no base: the base the adapter names, as AutoPeftModel loads it."""

from __future__ import annotations

import pytest
import torch
import transformers

from lora_cli.adapters import AdapterModel, LoraConfig, get_adapter_model
from lora_cli.errors import UserInputError
from tests.helpers import tiny_gpt2, tiny_vit
from tests.helpers_text import make_tokenizer

IDS = torch.tensor([[1, 5, 7, 9, 2]])


def _adapter(base_dir, adapter_dir, loader, config: LoraConfig, resize_to: int | None = None):
    """Save a fresh base to ``base_dir``, reload it from there (so it knows its path), adapt it with
    non-zero weights, save the adapter to ``adapter_dir``; returns the adapted model."""
    loader().save_pretrained(base_dir)
    model = type(loader()).from_pretrained(base_dir)
    if resize_to is not None:
        model.resize_token_embeddings(resize_to)
    model = get_adapter_model(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.adapter_parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.3)
    model.save_pretrained(adapter_dir)
    return model.eval()


def test_task_type_picks_the_auto_class_and_the_adapter_is_frozen(tmp_path):
    config = LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM")
    original = _adapter(tmp_path / "base", tmp_path / "adapter", tiny_gpt2, config)
    loaded = AdapterModel.from_pretrained(tmp_path / "adapter")
    assert type(loaded.get_base_model()).__name__ == "GPT2LMHeadModel"
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, original(input_ids=IDS).logits)
        with loaded.disable_adapter():
            assert (loaded(input_ids=IDS).logits - original(input_ids=IDS).logits).abs().max() > 1e-3

    trainable = AdapterModel.from_pretrained(tmp_path / "adapter", is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, _ in trainable.named_parameters() if ".lora_" in n
    }


def test_saved_revision_is_asked_for(tmp_path, monkeypatch):
    config = LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM", revision="v1.2")
    _adapter(tmp_path / "base", tmp_path / "adapter", tiny_gpt2, config)
    asked = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(name, *args, **kwargs):
        asked.append((str(name), kwargs.get("revision")))
        return real(name, *args, **{k: v for k, v in kwargs.items() if k != "revision"})

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    AdapterModel.from_pretrained(tmp_path / "adapter")
    assert asked == [(str(tmp_path / "base"), "v1.2")]


def test_no_task_type_uses_the_architecture_of_the_base(tmp_path):
    config = LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    original = _adapter(tmp_path / "base", tmp_path / "adapter", tiny_vit, config)
    loaded = AdapterModel.from_pretrained(tmp_path / "adapter")
    assert type(loaded.get_base_model()).__name__ == "ViTForImageClassification"
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, original(pixel_values=pixels).logits)


def test_embeddings_grow_to_a_larger_saved_tokenizer(tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok"))
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(120)])
    size = len(tokenizer)
    assert size > 99  # tiny_gpt2's vocabulary
    config = LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM")
    original = _adapter(tmp_path / "base", tmp_path / "adapter", tiny_gpt2, config, resize_to=size)
    tokenizer.save_pretrained(tmp_path / "adapter")
    loaded = AdapterModel.from_pretrained(tmp_path / "adapter")
    assert loaded.get_input_embeddings().num_embeddings == size
    with torch.no_grad():  # the new rows are freshly initialised: compare the original vocabulary
        torch.testing.assert_close(loaded(input_ids=IDS).logits[..., :99], original(input_ids=IDS).logits[..., :99])


def test_unknown_or_unreachable_base_is_a_clear_error(tmp_path):
    config = LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM")
    _adapter(tmp_path / "base", tmp_path / "adapter", tiny_gpt2, config)
    moved = tmp_path / "moved"
    (tmp_path / "base").rename(moved)
    with pytest.raises(UserInputError, match="cannot be loaded.*pass the base model yourself"):
        AdapterModel.from_pretrained(tmp_path / "adapter")
    loaded = AdapterModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(moved), tmp_path / "adapter")
    assert loaded.peft_config["default"].task_type == "CAUSAL_LM"

    blank = get_adapter_model(tiny_gpt2(), config)  # built from a config: no path to name
    blank.save_pretrained(tmp_path / "blank")
    with pytest.raises(UserInputError, match="no base_model_name_or_path"):
        AdapterModel.from_pretrained(tmp_path / "blank")
