"""LoRA on a bitsandbytes-quantized base (QLoRA), on the CPU: bitsandbytes 0.50's CPU backend
runs 4-bit (NF4/FP4, double quantization, any compute dtype) and 8-bit layers.

PEFT is the oracle: its bnb LoRA layers and ours, on the same quantized weights (the same
folder loaded twice through transformers' BitsAndBytesConfig), give equal logits, and the
adapter files have the same keys. Adapter weights are non-zero (init_lora_weights=False).
"""

from __future__ import annotations

import json

import bitsandbytes as bnb
import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from lora_cli.adapters import (
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    get_adapter_model,
    load_adapter_model,
)
from lora_cli.adapters.quantized import (
    BNB_4BIT,
    BNB_8BIT,
    backend_refusal,
    cpu_dequantizes_right,
    cpu_wrong_layers,
    dequantize_model,
    dequantize_weight,
    keep_standard_cpu_layout,
    quant_kind,
)
from lora_cli.errors import LoraCliError

TARGETS = ["q_proj", "v_proj", "down_proj"]
SETTINGS = {
    "nf4-f32": dict(bits=4, quant_type="nf4", compute_dtype=torch.float32, double_quant=False),
    "fp4-bf16-dq": dict(bits=4, quant_type="fp4", compute_dtype=torch.bfloat16, double_quant=True),
    "int8": dict(bits=8),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=96, initializer_range=0.2)
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def load_quantized(folder, bits: int, quant_type="nf4", compute_dtype=torch.float32, double_quant=False):
    q = BitsAndBytesConfig(load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_quant_type=quant_type,
                           bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=double_quant)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, device_map={"": "cpu"}).eval()
    keep_standard_cpu_layout(model)  # as loracli's loading does (no bf16 repacking on AVX512-BF16 CPUs)
    return model


def ids():
    return torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=ids()).logits.float()


def test_backend_runs_here():
    assert backend_refusal(4) is None and backend_refusal(8) is None


@pytest.mark.parametrize("bits, kind", [(4, BNB_4BIT), (8, BNB_8BIT)])
def test_layers_are_recognised_and_dequantize_to_what_they_compute(base_dir, bits, kind):
    model = load_quantized(base_dir, bits)
    layer = model.model.layers[0].self_attn.q_proj
    assert quant_kind(layer) == kind and quant_kind(model.lm_head) is None
    assert quant_kind(torch.nn.Linear(2, 2)) is None
    weight = dequantize_weight(layer)
    assert weight.shape == (64, 64) and weight.dtype == torch.float32
    x = torch.randn(5, 64)
    # 4-bit: the kernel multiplies by exactly this weight; 8-bit also quantizes the activations
    atol = 1e-5 if bits == 4 else 0.05 * float(weight.abs().max()) * 64 ** 0.5
    torch.testing.assert_close(layer(x).float(), x @ weight.T, atol=atol, rtol=1e-3)


def test_a_repacked_cpu_layer_still_dequantizes_to_its_weight(base_dir):
    model = load_quantized(base_dir, 4)
    layer = model.model.layers[0].self_attn.q_proj
    stored = dequantize_weight(layer)
    # bitsandbytes' AVX512-BF16 layout (what its eval forward switches to on such CPUs; made by hand
    # here so that every machine runs this): block scales rounded to bfloat16
    layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu
    repacked = dequantize_weight(layer)
    assert layer.weight.quant_state.packing_format_for_cpu  # read from copies: the layer is left as it was
    torch.testing.assert_close(repacked, stored, atol=0, rtol=2 ** -8)  # bf16 scales: within their rounding
    assert not torch.equal(repacked, stored)


def test_loading_keeps_the_standard_cpu_layout(base_dir):
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q, device_map={"": "cpu"})
    layers = [m for m in model.modules() if quant_kind(m) == BNB_4BIT]
    flagged = sum(bool(getattr(m, "support_avx512bf16_for_cpu", False)) for m in layers)
    assert keep_standard_cpu_layout(model) == flagged  # flagged: the layers this CPU would repack
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)
    assert keep_standard_cpu_layout(model) == 0


@pytest.fixture(scope="module")
def narrow_dir(tmp_path_factory):
    """A tiny Llama whose layer widths (48, 96) are not whole 4-bit blocks of 64."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=96)
    folder = tmp_path_factory.mktemp("narrow")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _row_blocking_kernel(monkeypatch):
    """bitsandbytes' dequantize as its faulty CPU kernel computes it: other values for a weight
    of several rows that are not whole blocks (the shape is what matters, not the data)."""
    real = bnb.functional.dequantize_4bit

    def faulty(data, state, *args, **kwargs):
        out = real(data, state, *args, **kwargs)
        rows, width = tuple(state.shape)
        return out + 1e-3 if rows > 1 and width % state.blocksize else out

    monkeypatch.setattr(bnb.functional, "dequantize_4bit", faulty)


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", False), ("fp4", False), ("nf4", True)])
def test_the_cpu_check_reads_the_real_layers_and_agrees_with_the_nf4_reference(narrow_dir, quant_type, double_quant):
    """The verdict is taken on the layer's own weight and shape, so it says on any CPU whether the
    layer computes what was stored; for NF4 that is the blockwise NormalFloat reference."""
    from lora_cli.adapters.quantized import nf_dequantized

    original = LlamaForCausalLM.from_pretrained(narrow_dir).model.layers[0].self_attn.q_proj.weight.detach()
    model = load_quantized(narrow_dir, 4, quant_type=quant_type, double_quant=double_quant)
    keep_standard_cpu_layout(model)
    layer = model.model.layers[0].self_attn.q_proj
    found = cpu_wrong_layers(model)
    right = cpu_dequantizes_right(layer)
    assert right is (("model.layers.0.self_attn.q_proj", 48, 64) not in found)
    if quant_type == "nf4" and not double_quant:
        assert torch.equal(dequantize_weight(layer), nf_dequantized(original, 4)) == cpu_dequantizes_right(layer)


def test_rows_that_the_cpu_kernel_dequantizes_wrongly_are_found_and_refused(narrow_dir, base_dir, monkeypatch):
    from lora_cli.errors import UserInputError
    from lora_cli.recipe.schema import ModelSection
    from lora_cli.tasks import quantization

    section = ModelSection(config={"model_type": "llama"}, quantization={"bits": 4})
    model = load_quantized(narrow_dir, 4)
    whole_blocks = load_quantized(base_dir, 4)  # widths 64 and 128
    _row_blocking_kernel(monkeypatch)
    found = cpu_wrong_layers(model)
    assert {path.rsplit(".", 1)[-1] for path, _, _ in found} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert ("model.layers.0.mlp.down_proj", 96, 64) in found
    assert cpu_wrong_layers(whole_blocks) == []  # whole blocks: the kernel's row blocks are the real ones
    with pytest.raises(UserInputError) as err:
        quantization.checked_on_cpu(model, section)
    message = str(err.value)
    assert "model.quantization" in message and "q_proj (in_features 48)" in message
    assert "multiple of 64" in message and "CUDA GPU" in message and "bits: 8" in message
    assert quantization.checked_on_cpu(whole_blocks, section) is whole_blocks


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_peft_adapter_on_quantized_base_loads_here_with_equal_logits(base_dir, tmp_path, setting, dora):
    torch.manual_seed(1)
    theirs = peft.get_peft_model(
        load_quantized(base_dir, **SETTINGS[setting]),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=dora),
    ).eval()
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__module__ == "peft.tuners.lora.bnb"
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "peft")

    ours = load_adapter_model(load_quantized(base_dir, **SETTINGS[setting]), tmp_path / "peft").eval()
    assert ours.get_nb_trainable_parameters()[1] == theirs.get_nb_trainable_parameters()[1]  # 4-bit counted unpacked
    layer = ours.base_model.model.layers[0].self_attn.q_proj
    assert quant_kind(layer.base_layer) is not None and layer.lora_A["default"].dtype == torch.float32
    got = logits(ours)
    with ours.disable_adapter():
        assert not torch.allclose(logits(ours), got, atol=1e-3), "the adapter changes nothing"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    ours.save_pretrained(tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(saved) == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))


def test_our_adapter_on_quantized_base_loads_in_peft(base_dir, tmp_path):
    torch.manual_seed(2)
    ours = get_adapter_model(load_quantized(base_dir, 4),
                             LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)).eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(load_quantized(base_dir, 4), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_training_step_moves_only_the_adapter(base_dir, bits):
    torch.manual_seed(3)
    model = get_adapter_model(load_quantized(base_dir, bits), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    model.train()
    layer = model.base_model.model.layers[0].self_attn.q_proj
    packed = layer.base_layer.weight.data.clone()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = ids()
    losses = []
    for _ in range(3):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        assert layer.lora_B["default"].grad.abs().sum() > 0
        optim.step()
        optim.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert torch.equal(layer.base_layer.weight.data, packed)  # the 4-bit / int8 weight never moves


def test_in_place_merge_is_refused_and_dequantize_then_merge_is_exact(base_dir, tmp_path):
    torch.manual_seed(4)
    model = get_adapter_model(load_quantized(base_dir, 4),
                              LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)).eval()
    packed = model.base_model.model.layers[0].self_attn.q_proj.base_layer.weight.data.clone()
    with pytest.raises(LoraCliError, match="cannot merge into the bitsandbytes-quantized Linear4bit.*dequantize"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(model.base_model.model.layers[0].self_attn.q_proj.base_layer.weight.data, packed)

    quantized = logits(model)
    paths = dequantize_model(model)
    assert len(paths) == 2 * 7 and not any(quant_kind(m) for m in model.modules())
    dequantized = logits(model)
    torch.testing.assert_close(dequantized, quantized, atol=1e-4, rtol=1e-4)  # fp32 compute: same weights
    merged = model.merge_and_unload(safe_merge=True)
    torch.testing.assert_close(logits(merged), dequantized, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert isinstance(plain.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert quant_kind(plain.model.layers[0].self_attn.q_proj) is None
    torch.testing.assert_close(logits(plain), dequantized, atol=1e-5, rtol=1e-5)


def test_dora_on_quantized_base_runs_on_the_dequantized_weight(base_dir):
    torch.manual_seed(5)
    model = get_adapter_model(load_quantized(base_dir, 4),
                              LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)).eval()
    layer = model.base_model.model.layers[0].self_attn.q_proj
    # m starts at the row norms of the dequantized weight (B = 0), so the adapter starts as the base
    torch.testing.assert_close(layer.lora_magnitude_vector["default"], dequantize_weight(layer.base_layer).norm(dim=1))
    with model.disable_adapter():
        base = logits(model)
    torch.testing.assert_close(logits(model), base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [LoHaConfig(r=4, alpha=8, target_modules=["q_proj"]),
                                    LoKrConfig(r=4, alpha=8, target_modules=["q_proj"])], ids=["loha", "lokr"])
def test_methods_without_a_quantized_path_refuse_with_the_fix(base_dir, config):
    with pytest.raises(LoraCliError, match="bitsandbytes-quantized Linear4bit.*only LoRA.*adapter.method: lora"):
        get_adapter_model(load_quantized(base_dir, 4), config)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_inits_that_rewrite_the_base_refuse_a_quantized_layer(base_dir, init):
    with pytest.raises(LoraCliError, match=rf"init_lora_weights='{init}' rewrites the base weight.*Linear4bit.*true"):
        get_adapter_model(load_quantized(base_dir, 4), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init))


def test_gpu_bench_qlora_part_runs_in_smoke_mode(tmp_path):
    """bench/gpu.py's QLoRA part at toy sizes on the CPU (figures meaningless): every variant trains."""
    import argparse

    from bench.gpu import QLORA_VARIANTS, qlora_bench

    args = argparse.Namespace(smoke=True, lm_batch=2, seq=8, rounds=1, steps=1)
    out = qlora_bench(torch.device("cpu"), args, tmp_path)
    assert set(out["variants"]) == set(QLORA_VARIANTS)
    for v in out["variants"].values():
        assert v["tokens_per_s"] > 0 and v["trainable"] > 0
    losses = [v["first_loss"] for v in out["variants"].values()]
    assert max(losses) - min(losses) < 0.1  # the same random model, three ways of storing it


def test_bnb_layer_kinds_are_plain_linears_to_torch():
    layer = bnb.nn.Linear4bit(16, 8, quant_type="nf4")
    assert isinstance(layer, torch.nn.Linear) and quant_kind(layer) == BNB_4BIT


# ------------------------------------------------------------------ end to end: train, eval, merge
def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    import sys

    from lora_cli.cli import main

    capsys.readouterr()  # drop what training printed
    monkeypatch.setattr(sys, "argv", ["loracli", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


@pytest.mark.slow
@pytest.mark.parametrize("quantization", [{"bits": 4, "compute_dtype": "float32"}, {"bits": 8}], ids=["4bit", "8bit"])
def test_qlora_recipe_trains_evaluates_and_merges_to_full_precision(tmp_path, monkeypatch, capsys, quantization):
    from lora_cli.inference.loading import load_run
    from lora_cli.training.pipeline import run_training
    from tests.helpers_text import (
        TINY_CONFIGS,
        logits_of,
        make_tokenizer,
        prompt_rows,
        write_jsonl,
        write_recipe,
    )

    write_jsonl(tmp_path / "train.jsonl", prompt_rows())
    recipe = write_recipe(
        tmp_path / "recipe.yaml", task="causal-lm",
        # widths 64 / 128: whole 4-bit blocks, which bitsandbytes' CPU kernel needs (test_rows_that_...)
        model={"config": {**TINY_CONFIGS["opt"], "hidden_size": 64, "word_embed_proj_dim": 64, "ffn_dim": 128},
               "tokenizer": str(make_tokenizer(tmp_path / "tok")), "quantization": quantization},
        data={"train_file": str(tmp_path / "train.jsonl"), "max_length": 32},
        adapter={"target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}, training={"max_steps": 2})
    run_dir = run_training(recipe)
    run = load_run(run_dir, device="cpu")
    layer = run.model.base_model.model.decoder.layers[0].self_attn.q_proj
    assert quant_kind(layer.base_layer) == (BNB_4BIT if quantization["bits"] == 4 else BNB_8BIT)

    code, out, err = _cli(monkeypatch, capsys, "eval", str(run_dir), "--json")
    assert code == 0, err
    assert json.loads(out)["loss"] > 0

    code, _, err = _cli(monkeypatch, capsys, "merge", str(run_dir), "--out", str(tmp_path / "merged"))
    assert code == 0, err
    assert "verified on" in err
    merged_dir = tmp_path / "merged"
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any(quant_kind(m) for m in merged.modules())
    ds = run.task.eval_dataset(run.recipe.data, run.recipe.seed, run.processor, limit=4)
    batch = run.task.make_collator(run.processor, run.recipe.data)([ds[i] for i in range(len(ds))])
    expected = logits_of(run.model, batch)
    dequantize_model(run.model)
    torch.testing.assert_close(logits_of(merged, batch), logits_of(run.model, batch), atol=1e-4, rtol=1e-4)
    if quantization["bits"] == 4:  # fp32 compute: the 4-bit forward is the dequantized one
        torch.testing.assert_close(logits_of(merged, batch), expected, atol=1e-4, rtol=1e-4)

    their_base = AutoModelForCausalLM.from_pretrained(run_dir / "base_model", device_map={"": "cpu"})
    keep_standard_cpu_layout(their_base)  # else bitsandbytes computes in bf16 on AVX512-BF16 CPUs, unlike training
    theirs = peft.PeftModel.from_pretrained(their_base, run_dir / "adapter").eval()
    torch.testing.assert_close(logits_of(theirs, batch), expected, atol=1e-5, rtol=1e-5)
