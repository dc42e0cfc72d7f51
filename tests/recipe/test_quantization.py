"""model.quantization: typed, validated with file:line, refused up front where it cannot run."""

from __future__ import annotations

import importlib.util

import pytest

from lora_cli.adapters import quantized
from lora_cli.errors import UserInputError
from lora_cli.recipe import load_recipe
from lora_cli.tasks import quantization as tq
from tests.recipe._util import VALID, problems_of


def with_quant(write, block: str, name: str = "recipe.yaml"):
    """VALID with ``block`` (YAML lines of model.quantization, indented 4) after model.config's keys."""
    return write(VALID.replace("data:\n", f"  quantization:\n{block}data:\n", 1), name)


def test_the_section_is_typed_and_round_trips(write):
    recipe = load_recipe(with_quant(write, "    bits: 4\n    quant_type: fp4\n    compute_dtype: float32\n"))
    q = recipe.model.quantization
    assert (q.bits, q.quant_type, q.double_quant, q.compute_dtype) == (4, "fp4", True, "float32")
    assert recipe.to_dict()["model"]["quantization"] == {
        "bits": 4, "quant_type": "fp4", "double_quant": True, "compute_dtype": "float32"}
    again = write(recipe.to_yaml(), "resolved.yaml")
    assert load_recipe(again) == recipe


def test_defaults_are_qlora_and_eight_bit_writes_only_bits(write):
    q = load_recipe(with_quant(write, "    bits: 4\n")).model.quantization
    assert (q.quant_type, q.double_quant, q.compute_dtype) == ("nf4", True, "bfloat16")
    recipe = load_recipe(with_quant(write, "    bits: 8\n", "eight.yaml"))
    assert recipe.to_dict()["model"]["quantization"] == {"bits": 8}
    assert load_recipe(write(recipe.to_yaml(), "resolved.yaml")) == recipe
    assert load_recipe(write(VALID, "plain.yaml")).model.quantization is None


def test_an_override_sets_it(write):
    recipe = load_recipe(write(VALID), ["model.quantization={bits: 8}"])
    assert recipe.model.quantization.bits == 8


@pytest.mark.parametrize(
    "block, expected",
    [
        ("    bits: 3\n", "recipe.yaml:13: model.quantization.bits: must be 4 or 8 (got 3; 4 for QLoRA"),
        ("    bits: four\n", "recipe.yaml:13: model.quantization.bits: must be an integer (got 'four'"),
        ("    bits: 4\n    quant_type: nf5\n",
         "recipe.yaml:14: model.quantization.quant_type: must be nf4 or fp4 (got 'nf5'; did you mean nf4?)"),
        ("    bits: 4\n    compute_dtype: bf16\n",
         "recipe.yaml:14: model.quantization.compute_dtype: must be one of bfloat16, float16, float32 (got 'bf16'"),
        ("    bits: 4\n    double_quant: maybe\n", "recipe.yaml:14: model.quantization.double_quant: must be true or false"),
        ("    bits: 4\n    doble_quant: true\n",
         "recipe.yaml:14: model.quantization.doble_quant: is not a quantization key (got True; did you mean double_quant?)"),
        ("    bits: 8\n    quant_type: nf4\n",
         "recipe.yaml:14: model.quantization.quant_type: is a 4-bit setting; 8-bit layers have none (got 'nf4'; "
         "remove it, or set bits: 4)"),
        ("    quant_type: nf4\n", "recipe.yaml:12: model.quantization.bits: is required"),
    ],
)
def test_bad_values_name_file_line_key_and_fix(write, block, expected):
    (problem,) = problems_of(with_quant(write, block))
    assert problem.startswith(expected), problem


def test_missing_bitsandbytes_is_one_problem_naming_the_extra(write, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    (problem,) = problems_of(with_quant(write, "    bits: 4\n"))
    assert problem.startswith("recipe.yaml:12: model.quantization: needs the bitsandbytes package, which is not installed")
    assert "pip install 'loracli[quant]'" in problem
    with pytest.raises(UserInputError, match=r"model.quantization: needs the bitsandbytes.*loracli\[quant\]"):
        tq.require_backend(4)


def test_a_machine_that_needs_cuda_gets_one_problem_before_loading(write, monkeypatch):
    """An install whose layers have no CPU kernels, on a machine without CUDA: the recipe names the key."""
    import bitsandbytes as bnb

    def no_kernel(self, x):
        raise RuntimeError("no kernel image for the CPU")

    monkeypatch.setattr(quantized.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(quantized, "_PROBED", {})
    monkeypatch.setattr(bnb.nn.Linear8bitLt, "forward", no_kernel)
    (problem,) = problems_of(with_quant(write, "    bits: 8\n"))
    assert problem.startswith("recipe.yaml:12: model.quantization: needs a CUDA GPU: this machine has none, and "
                              f"bitsandbytes {bnb.__version__} cannot run 8-bit layers on the CPU (RuntimeError: no kernel")
    assert "run on a machine with a CUDA GPU, or upgrade bitsandbytes" in problem
    with pytest.raises(UserInputError, match="model.quantization: needs a CUDA GPU"):
        tq.require_backend(8)


def test_the_real_probe_passes_on_this_cpu(write, monkeypatch):
    monkeypatch.setattr(quantized, "_PROBED", {})
    assert quantized._probe_cpu(4) is None and quantized._probe_cpu(8) is None


def test_bnb_config_carries_the_section(write):
    recipe = load_recipe(with_quant(write, "    bits: 4\n    quant_type: fp4\n    double_quant: false\n"))
    kwargs = tq.load_kwargs(recipe.model)
    config = kwargs["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "fp4" and not config.bnb_4bit_use_double_quant
    assert str(config.bnb_4bit_compute_dtype).endswith("bfloat16")
    assert "classifier" in config.llm_int8_skip_modules and "lm_head" in config.llm_int8_skip_modules
    assert kwargs["device_map"] == {"": "cpu"} or isinstance(kwargs["device_map"][""], int)
    assert tq.load_kwargs(load_recipe(write(VALID, "plain.yaml")).model) == {}


@pytest.mark.parametrize("bits", [4, 8])
def test_a_model_built_from_config_loads_quantized_with_its_head_in_full_precision(bits):
    import torch

    from lora_cli.adapters.quantized import quant_kind
    from lora_cli.recipe import ModelSection
    from lora_cli.tasks import image_classification

    section = ModelSection.model_validate({
        # widths in whole 64-value blocks: bitsandbytes' AVX-512 CPU kernel dequantizes other rows wrongly,
        # which loracli refuses (tests/adapters/test_quantized.py); this test is about loading, on any CPU
        "config": {"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                   "intermediate_size": 128, "image_size": 32, "patch_size": 8},
        "quantization": {"bits": bits, **({"compute_dtype": "float32"} if bits == 4 else {})},
    })
    torch.manual_seed(0)
    model = image_classification.build_model(section, ["a", "b", "c"])
    kinds = {name: quant_kind(m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds.pop("classifier") is None  # a head trains in full: never quantized
    assert kinds and set(kinds.values()) == {"bnb_4bit" if bits == 4 else "bnb_8bit"}
    assert model(pixel_values=torch.randn(2, 3, 32, 32)).logits.shape == (2, 3)
