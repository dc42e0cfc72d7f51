"""LoftQ (init_lora_weights: loftq) against PEFT 0.21 and bitsandbytes, on a CPU.

PEFT 0.21's ``loftq_init`` quantizes through bitsandbytes and sends the weight to "cuda";
bitsandbytes 0.50 quantizes on the CPU too, so the oracle here runs PEFT's own function with
"cuda" redirected to the CPU (``_cuda_as_cpu``): the quantized base and the factors must be
the same bits. 2-bit NF (dropped by PEFT 0.20) is checked against its level table.
"""

from __future__ import annotations

import contextlib

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import peft
import pytest
import torch
from peft.utils import loftq_utils
from safetensors.torch import load_file

from lora_cli.adapters import AdapterModel, LoraConfig, get_adapter_model
from lora_cli.adapters import quantized as nf
from lora_cli.adapters.base_weights import BASE_REWRITES_NAME
from lora_cli.adapters.config import AdapterConfig
from lora_cli.adapters.methods.lora import loftq as lq
from lora_cli.errors import AdapterConfigError
from tests.helpers import tiny_gpt2, tiny_opt


def _fix(device):
    if (isinstance(device, str) and device.startswith("cuda")) or (isinstance(device, torch.device) and device.type == "cuda"):
        return "cpu"
    return device


@contextlib.contextmanager
def _cuda_as_cpu():
    """Every ``.to("cuda")`` of a tensor or a bitsandbytes parameter goes to the CPU instead."""
    saved = {}
    for cls in (torch.Tensor, bnb.nn.Params4bit, bnb.nn.Int8Params):
        original = cls.to
        saved[cls] = cls.__dict__.get("to")

        def to(self, *args, _original=original, **kwargs):
            return _original(self, *(_fix(a) for a in args), **{k: _fix(v) for k, v in kwargs.items()})

        cls.to = to
    try:
        yield
    finally:
        for cls, original in saved.items():
            if original is None:
                del cls.to
            else:
                cls.to = original


def _ids():
    return {"input_ids": torch.randint(2, 99, (2, 8), generator=torch.Generator().manual_seed(1))}


def _logits(model, inputs=None):
    with torch.no_grad():
        return model(**(inputs or _ids())).logits


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("iters", [1, 3])
def test_factors_match_peft_loftq_init(bits, iters):
    weight = torch.randn(48, 40, generator=torch.Generator().manual_seed(bits + iters))
    with _cuda_as_cpu():
        q, a, b = loftq_utils.loftq_init(weight.clone(), num_bits=bits, reduced_rank=4, num_iter=iters)
    ours = lq.loftq_factors(weight, bits, 4, iters)
    for mine, theirs in zip(ours, (q, a, b), strict=True):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


def test_quantizers_match_bitsandbytes():
    weight = torch.randn(40, 36, generator=torch.Generator().manual_seed(0))  # 1440 values: a short last block
    packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", blocksize=64)
    torch.testing.assert_close(nf.nf_dequantized(weight, 4), bnbf.dequantize_4bit(packed, state), atol=0, rtol=0)
    rows, stats, _ = bnbf.int8_vectorwise_quant(weight.half())
    torch.testing.assert_close(nf.int8_dequantized(weight), bnbf.int8_vectorwise_dequant(rows, stats), atol=0, rtol=0)
    torch.testing.assert_close(nf.normal_float_levels(4), bnbf.get_4bit_type("nf4", device="cpu"), atol=0, rtol=0)


def test_nf2_levels_and_the_alternating_fit_reduces_the_error():
    torch.testing.assert_close(nf.normal_float_levels(2), torch.tensor([-1.0, 0.0, 0.33791524171829224, 1.0]))
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    q2 = nf.nf_dequantized(weight, 2)
    normed = (q2.reshape(-1, 64) / weight.reshape(-1, 64).abs().amax(1, keepdim=True)).reshape(-1, 1)
    assert (normed - nf.normal_float_levels(2)).abs().amin(dim=1).max() < 1e-6  # every value is one of 4 levels
    errors = []
    for iters in (1, 2, 4):
        q, a, b = lq.loftq_factors(weight, 2, 8, iters)
        errors.append(torch.linalg.norm(weight - q - b @ a).item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] < torch.linalg.norm(weight - q2).item()  # the low-rank part absorbs quantization error


def _opt_whole_blocks():
    """A tiny OPT whose layer widths (64, 128) are whole 4-bit blocks: bitsandbytes 0.50's native
    CPU dequantize kernel, which PEFT's LoftQ calls, is wrong for rows that are not (see
    ``quantized.cpu_dequantizes_right``); loracli's own NF4 math is right for any width."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=128,
                                    vocab_size=99, word_embed_proj_dim=64, max_position_embeddings=64,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=1)).eval()


def test_model_start_matches_peft():
    kw = {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj", "fc1"], "init_lora_weights": "loftq",
          "loftq_config": {"loftq_bits": 4, "loftq_iter": 2}}
    build = _opt_whole_blocks
    ours = get_adapter_model(build(), LoraConfig(**kw))
    with _cuda_as_cpu():
        theirs = peft.get_peft_model(build(), peft.LoraConfig(**kw))
    mine = dict(ours.base_model.named_parameters())
    pristine = dict(build().named_parameters())
    compared = moved = 0
    for key, value in theirs.base_model.model.named_parameters():
        if ".base_layer.weight" in key or ".lora_A." in key or ".lora_B." in key:
            torch.testing.assert_close(mine[key.replace(".default.weight", ".default")], value, atol=0, rtol=0, msg=key)
            compared += 1
        if key.endswith(".base_layer.weight"):
            moved += not torch.equal(value, pristine[key.replace(".base_layer", "")])
    assert compared == 3 * moved > 0


def test_gpt2_conv1d_is_fitted_in_the_out_by_in_layout():
    """PEFT 0.21 fits GPT-2's stored (in, out) Conv1D weight as it is and sets A to (r, out),
    which its forward then cannot multiply; here the fit is of W (out, in), stored back as (in, out)."""
    kw = {"r": 4, "lora_alpha": 4, "target_modules": ["c_attn"], "init_lora_weights": "loftq",
          "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}
    ours = get_adapter_model(tiny_gpt2(), LoraConfig(**kw))
    layer = ours.base_model.get_submodule("transformer.h.0.attn.c_attn")
    original = tiny_gpt2().get_submodule("transformer.h.0.attn.c_attn").weight.detach()
    q, a, b = lq.loftq_factors(original.T, 4, 4, 1)
    torch.testing.assert_close(layer.base_layer.weight.detach(), q.T, atol=0, rtol=0)
    torch.testing.assert_close(layer.lora_A["default"].detach(), a, atol=0, rtol=0)
    torch.testing.assert_close(layer.lora_B["default"].detach(), b, atol=0, rtol=0)
    assert _logits(ours).isfinite().all()


def test_saved_for_the_original_base_loads_here_and_in_peft(tmp_path):
    kw = {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": "loftq",
          "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}
    ours = get_adapter_model(tiny_opt(), LoraConfig(**kw)).eval()
    with torch.no_grad():
        for _, layer in ours.adapter_layers():
            layer.lora_A["default"].add_(0.05 * torch.randn_like(layer.lora_A["default"]))  # "trained"
    expected = _logits(ours)
    ours.save_pretrained(tmp_path / "unconverted")  # what checkpoints hold: re-running LoftQ on load is exact
    again = AdapterModel.from_pretrained(tiny_opt(), tmp_path / "unconverted")
    torch.testing.assert_close(_logits(again), expected, atol=1e-6, rtol=0)

    ours.save_pretrained(tmp_path / "out", convert_to_original_base=True)
    config = AdapterConfig.from_pretrained(tmp_path / "out")
    assert config.init_lora_weights is True and config.loftq_config == {} and config.r == 4
    rewrites = load_file(tmp_path / "out" / BASE_REWRITES_NAME)
    assert sorted(rewrites) == sorted(f"{p}.weight" for p in ours.targets["default"])
    loaded = AdapterModel.from_pretrained(tiny_opt(), tmp_path / "out")
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-6, rtol=0)
    base = tiny_opt()  # a PEFT user: the rewritten weights into the base, then the adapter
    missing, unexpected = base.load_state_dict(rewrites, strict=False)
    assert not unexpected
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "out").eval()
    torch.testing.assert_close(_logits(theirs), expected, atol=1e-5, rtol=0)
    with pytest.raises(Exception, match=BASE_REWRITES_NAME):
        loaded.load_adapter(tmp_path / "out", "second")


def test_config_problems():
    with pytest.raises(AdapterConfigError, match="loftq_config"):
        LoraConfig(init_lora_weights="loftq")
    with pytest.raises(AdapterConfigError, match="loftq_bits"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 3, "loftq_iter": 1})
    with pytest.raises(AdapterConfigError, match="only used with init_lora_weights"):
        LoraConfig(loftq_config={"loftq_bits": 4})


def test_peft_saved_loftq_adapter_loads_here():
    """A PEFT LoftQ adapter holds init_lora_weights "loftq": loading re-quantizes the base
    (the same bits as PEFT's) and reads A and B from the file, as PEFT does."""
    import tempfile

    kw = {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": "loftq",
          "loftq_config": {"loftq_bits": 8, "loftq_iter": 2}}
    with _cuda_as_cpu():
        theirs = peft.get_peft_model(tiny_opt(), peft.LoraConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".lora_A." in name:
                p.add_(0.05 * torch.randn_like(p))
    expected = _logits(theirs)
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        ours = AdapterModel.from_pretrained(tiny_opt(), folder)
    assert ours.peft_config["default"].loftq_config == {"loftq_bits": 8, "loftq_iter": 2}
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=0)
