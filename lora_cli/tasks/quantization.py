"""``model.quantization``: every task's base model loaded through transformers' ``BitsAndBytesConfig``.

    model:
      name_or_path: ./my-llama
      quantization: {bits: 4, quant_type: nf4, double_quant: true, compute_dtype: bfloat16}

The frozen base linears become bitsandbytes ``Linear4bit`` (NF4 / FP4 blocks, QLoRA) or
``Linear8bitLt`` (LLM.int8); the engine's LoRA wraps them (lora_cli/adapters/quantized.py).
Heads the task trains in full (``classifier``, ``score``, ...) and ``lm_head`` stay in full
precision: a quantized head could not train.

A model built from ``model.config`` has no checkpoint to quantize while loading: it is built
with random weights, saved to a temporary folder and loaded back through the same
``from_pretrained`` path, so both kinds of recipe quantize identically. A run's saved
``base_model/`` (the full-precision random base) loads quantized the same way.

Where it runs: with a CUDA GPU, the model goes to the current (or LOCAL_RANK's) GPU; without
one, on the CPU, which bitsandbytes releases with a CPU backend (0.50: 4-bit NF4/FP4 with
any compute dtype, double quantization, 8-bit) support. The recipe check refuses a machine
that can run neither before anything loads; :func:`require_backend` repeats it for callers
that skip the recipe.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lora_cli.adapters.quantized import backend_refusal, cpu_wrong_layers, keep_standard_cpu_layout
from lora_cli.errors import UserInputError
from lora_cli.hf_names import CLASSIFICATION_HEADS, new_heads_line
from lora_cli.recipe import ModelSection

KEEP_FULL_PRECISION = (*CLASSIFICATION_HEADS, "lm_head")
"""Modules never quantized: trained heads and the LM head (transformers skips lm_head by default too)."""

NEW_HEADS_NOTE = "_loracli_new_heads"
"""Attribute of a loaded model: the line naming the head weights initialised from scratch, or None."""

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def require_backend(bits: int) -> None:
    """Raise :class:`UserInputError` naming ``model.quantization`` when bitsandbytes cannot run here."""
    refusal = backend_refusal(bits)
    if refusal is not None:
        raise UserInputError(f"model.quantization: {refusal[0]}; {refusal[1]}")


def bnb_config(model_cfg: ModelSection):
    """The section as a transformers ``BitsAndBytesConfig``, or None when the recipe has none."""
    quant = model_cfg.quantization
    if quant is None:
        return None
    require_backend(quant.bits)
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(KEEP_FULL_PRECISION))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
        llm_int8_skip_modules=list(KEEP_FULL_PRECISION),
    )


def device_map() -> dict[str, Any]:
    """Where a quantized model loads: this process's GPU (LOCAL_RANK under torchrun), else the CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return {"": "cpu"}


def load_kwargs(model_cfg: ModelSection, source: str | Path | None = None) -> dict[str, Any]:
    """Extra ``from_pretrained`` keyword arguments: none without ``model.quantization``.

    ``source``: a run's saved ``base_model/``. A quantized run saves its base quantized, and
    that folder's own ``quantization_config`` then decides (the same settings, from the recipe).
    """
    config = bnb_config(model_cfg)
    if config is None:
        return {}
    if source is not None and _saved_quantized(Path(source)):
        return {"device_map": device_map()}
    return {"quantization_config": config, "device_map": device_map()}


def _saved_quantized(folder: Path) -> bool:
    try:
        return "quantization_config" in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def from_pretrained(auto_cls, path: str | Path, model_cfg: ModelSection, source: str | Path | None = None, **kwargs):
    """``auto_cls.from_pretrained(path, **kwargs)``, quantized when the recipe asks for it
    (:func:`load_kwargs`) and then :func:`checked_on_cpu`: every task loads a pretrained model here.

    With ``ignore_mismatched_sizes`` (a classifier's new head), the head weights the checkpoint
    did not give are named in the model's :data:`NEW_HEADS_NOTE` attribute (``train`` prints it)."""
    replacing = bool(kwargs.get("ignore_mismatched_sizes"))
    loaded = auto_cls.from_pretrained(path, **kwargs, **load_kwargs(model_cfg, source), output_loading_info=replacing)
    model, info = loaded if replacing else (loaded, None)
    if replacing:
        setattr(model, NEW_HEADS_NOTE, new_heads_line(model, info))
    return checked_on_cpu(model, model_cfg)


def from_config(auto_cls, config, model_cfg: ModelSection):
    """A random-init ``auto_cls`` model from ``config``, quantized when the recipe asks for it."""
    model = auto_cls.from_config(config)
    if model_cfg.quantization is None:
        return model
    with tempfile.TemporaryDirectory(prefix="loracli-quantize-") as tmp:
        model.save_pretrained(tmp)
        del model
        return from_pretrained(auto_cls, tmp, model_cfg)


def checked_on_cpu(model, model_cfg: ModelSection):
    """A freshly loaded model, made safe to run quantized on the CPU (a no-op on a GPU or unquantized).

    Keeps bitsandbytes' standard 4-bit layout (:func:`~lora_cli.adapters.quantized.keep_standard_cpu_layout`)
    and refuses, naming them, 4-bit layers that bitsandbytes' CPU kernel here would compute wrongly
    (:func:`~lora_cli.adapters.quantized.cpu_wrong_layers`): rows that are not a multiple of the block size.
    """
    if model_cfg.quantization is None or torch.cuda.is_available():
        return model
    keep_standard_cpu_layout(model)
    wrong = cpu_wrong_layers(model)
    if wrong:
        import bitsandbytes

        shown = ", ".join(f"{path} (in_features {width})" for path, width, _ in wrong[:4])
        more = f" and {len(wrong) - 4} more" if len(wrong) > 4 else ""
        raise UserInputError(
            f"model.quantization: bitsandbytes {bitsandbytes.__version__} computes these 4-bit layers wrongly on "
            f"the CPU: {shown}{more}. Its CPU kernel dequantizes a weight correctly only when each row holds a "
            f"multiple of {wrong[0][2]} values (a bitsandbytes bug; CUDA is not affected). Run on a CUDA GPU, use "
            "bits: 8, or a model whose layer widths are multiples of 64"
        )
    return model
