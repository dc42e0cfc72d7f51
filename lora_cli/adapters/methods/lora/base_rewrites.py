"""Inits that rewrite base weights, and how their runs reload exactly.

PiSSA, OLoRA, CorDA and LoRA-GA start from W' = W - s B0 A0; LoftQ replaces W by its
dequantized values Q. Each layer records what its init did (``LoraLayer.record_base_rewrite``
/ ``record_base_weight``, kept in ``layer.base_rewrites``). Recomputing the init when the run
is loaded again is not exact (``pissa_niter_N`` is a randomised SVD; CorDA, LoRA-GA and EVA
depend on calibration data), so nothing is recomputed:

- the delivered adapter (``save_pretrained(..., convert_to_original_base=True)``, what
  ``loracli train`` writes to ``adapter/``) is a plain LoRA relative to the ORIGINAL base:
  W' + s B A = W + s [B, -B0] [A; A0], so a rewritten layer gets rank 2r, every other layer
  of the adapter is padded with zeros to 2r, r and every rank_pattern value double and
  lora_alpha and every alpha_pattern value are multiplied by 2 (sqrt(2) with rsLoRA), which
  keeps every scaling; ``init_lora_weights`` becomes true. PEFT's
  ``path_initial_model_for_weight_conversion`` writes the same.
- a change that is not low rank (LoftQ; also a rewritten layer under DoRA, whose magnitude
  is relative to W') is saved as the weight itself, ``base_rewrites.safetensors`` beside the
  adapter files, keyed ``<module path>.weight`` as in the base model's own state dict.
  Loading the adapter here copies them into the base first. A PEFT user does the same:
  ``base.load_state_dict(safetensors.torch.load_file(".../base_rewrites.safetensors"),
  strict=False)`` and then ``PeftModel.from_pretrained(base, ...)``.
- ``--resume`` rebuilds W' without the init from :func:`initial_state` (A0, B0 or Q per
  layer), saved once in the run directory: :func:`restore_initial_state` computes
  ``fn.low_rank_residual`` exactly as the init did, so the base is the same bit for bit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lora_cli import atomic
from lora_cli.adapters import functional as fn
from lora_cli.adapters.methods.lora import starts
from lora_cli.adapters.state import KEY_PREFIX
from lora_cli.errors import LoraCliError, UserInputError

_RANK_KEYS = {"lora_A.weight": 0, "lora_B.weight": 1, "lora_embedding_A": 0, "lora_embedding_B": 1}
"""File key suffix -> the dim that holds the rank."""


def rewritten_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module, dict[str, Tensor]]]:
    """(module path, layer, record) of every layer whose base the adapter's init rewrote."""
    return [
        (path, layer, layer.base_rewrites[adapter_name])
        for path, layer in model.adapter_layers()
        if adapter_name in getattr(layer, "base_rewrites", {})
    ]


# ----------------------------------------------------------------- --resume
def initial_state(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """Everything needed to rebuild the rewritten bases without the init:
    {"<path>.lora_A": A0, "<path>.lora_B": B0} or {"<path>.weight": W'} per layer."""
    if not starts.rewrites_base(getattr(model.peft_config[adapter_name], "init_lora_weights", None)):
        return {}
    return {f"{path}.{key}": tensor.contiguous() for path, _, record in rewritten_layers(model, adapter_name)
            for key, tensor in record.items()}


def save_initial_state(model: nn.Module, file: str | os.PathLike, adapter_name: str = "default") -> bool:
    """Write :func:`initial_state` as safetensors; False (nothing written) when no base was rewritten."""
    state = initial_state(model, adapter_name)
    if not state:
        return False
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_file(file) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return True


@torch.no_grad()
def restore_initial_state(model: nn.Module, state: Mapping[str, Tensor], adapter_name: str = "default") -> None:
    """Rewrite the (untouched) bases of ``model`` as the recorded init did, set A and B to
    their start, and record it again on each layer. The model was built with a config whose
    init does not touch the base (``init_lora_weights: true``)."""
    layers = dict(model.adapter_layers())
    by_path: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        path, _, kind = key.rpartition(".")
        by_path.setdefault(path, {})[kind] = tensor
    for path, record in by_path.items():
        layer = layers.get(path)
        if layer is None or adapter_name not in layer.r:
            raise UserInputError(
                f"the run's recorded start names {path!r}, which adapter {adapter_name!r} does not adapt; the "
                "recipe's adapter section changed since the run started: train without --resume"
            )
        if "weight" in record:
            layer.base_weight().data.copy_(record["weight"].to(layer.base_weight()))
            layer.record_base_weight(adapter_name, record["weight"])
            continue
        a0, b0 = record["lora_A"], record["lora_B"]
        weight = layer.canonical_weight()
        s = layer.scaling[adapter_name]
        a, b = layer.factors(adapter_name)
        a.copy_(a0)
        b.copy_(b0)
        layer.base_weight().data.copy_(layer.to_raw(fn.low_rank_residual(weight, a0.to(weight.device), b0.to(weight.device), s)))
        layer.record_base_rewrite(adapter_name, a0, b0)


# ------------------------------------------------------------ saving converted
def convert_to_original_base(
    model: nn.Module, adapter_name: str, state: dict[str, Tensor], config: Any
) -> tuple[dict[str, Tensor], Any, dict[str, Tensor]]:
    """(state, config, base weights) of adapter ``adapter_name`` relative to the original
    base: see the module docstring. ``state`` is in file-key form; unchanged (with no base
    weights) when the adapter's init rewrote nothing."""
    layers = rewritten_layers(model, adapter_name)
    if not layers or not starts.rewrites_base(getattr(config, "init_lora_weights", None)):
        return state, config, {}
    state = dict(state)
    base_weights: dict[str, Tensor] = {}
    low_rank: dict[str, dict[str, Tensor]] = {}
    for path, layer, record in layers:
        if layer.merged:
            raise LoraCliError(f"{path}: unmerge the adapter before saving it for the original base")
        if "weight" in record or adapter_name in getattr(layer, "lora_variant", {}):
            base_weights[f"{path}.weight"] = layer.base_weight().detach().to("cpu").contiguous()
        else:
            low_rank[path] = record
    config = starts.plain_config(config)
    if not low_rank:
        return state, config, base_weights
    paths = [p for p, layer in model.adapter_layers() if adapter_name in layer.r]
    for path in paths:
        record = low_rank.get(path)
        for suffix, dim in _RANK_KEYS.items():
            key = f"{KEY_PREFIX}{path}.{suffix}"
            if key not in state:
                continue
            tensor = state[key]
            if record is None:
                extra = torch.zeros_like(tensor)
            else:
                start = record["lora_A" if dim == 0 else "lora_B"].to(tensor)
                extra = start if dim == 0 else -start
                if extra.shape != tensor.shape:
                    raise LoraCliError(f"{path}: the recorded start {tuple(extra.shape)} does not fit {key} {tuple(tensor.shape)}")
            state[key] = torch.cat([tensor, extra], dim=dim).contiguous()
    factor = math.sqrt(2) if getattr(config, "use_rslora", False) else 2
    config = config.replace(
        r=config.r * 2,
        lora_alpha=config.lora_alpha * factor,
        rank_pattern={k: v * 2 for k, v in (config.rank_pattern or {}).items()},
        alpha_pattern={k: v * factor for k, v in (config.alpha_pattern or {}).items()},
    )
    return state, config, base_weights
