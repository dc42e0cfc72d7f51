"""LoRA-GA (Wang et al., arXiv:2407.05000): a LoRA start aligned with the gradient of full
fine-tuning, estimated from a few batches.

    G = mean over batches of dL/dW          (out, in), per adapted layer
    A, B from the top 2r singular triplets of G      (:func:`functional.lora_ga_factors`)
    W <- W - s B A                                   (the model starts where it was)

    model = get_adapter_model(base, LoraConfig(init_lora_weights="lora_ga", lora_ga_config={...}))
    initialize_lora_ga_weights(model, batches)       # batches: dicts of tensors, forward gives .loss

Until :func:`initialize_lora_ga_weights` runs, a ``lora_ga`` adapter is a plain zero-delta
LoRA (A kaiming, B = 0) on an untouched base, which is also what PEFT builds when it loads
such an adapter without gradients. The rewritten base is recorded on each layer
(``LoraLayer.record_base_rewrite``) so that the trained adapter is saved relative to the
original base (:mod:`lora_cli.adapters.methods.lora.base_rewrites`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from lora_cli.adapters import functional as fn
from lora_cli.adapters.methods.lora.starts import find
from lora_cli.errors import UserInputError


def _ga_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    layers = [(p, m) for p, m in model.adapter_layers() if adapter_name in m.r and hasattr(m, "record_base_rewrite")]
    if not layers:
        raise UserInputError(f"LoRA-GA: adapter {adapter_name!r} adapts no LoRA layer; check target_modules")
    bad = [p for p, m in layers if m.canonical_weight().dim() != 2]
    if bad:
        raise UserInputError(
            f"LoRA-GA supports Linear and GPT-2 Conv1D layers only, not {', '.join(bad[:3])}; "
            "exclude these modules (exclude_modules) or use another init"
        )
    return layers


def estimate_gradients(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], adapter_name: str = "default") -> dict[str, Tensor]:
    """Mean gradient of the loss w.r.t. each adapted base weight over ``batches``, in the
    canonical (out, in) layout: {module path: G}. Runs with the adapters disabled (the model
    of the gradient is the base) and in training mode (dropout on), as PEFT's estimate does;
    nothing but these weights gets a gradient, and every flag is restored afterwards."""
    layers = _ga_layers(model, adapter_name)
    was_training = model.training
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    sums: dict[str, Tensor] = {}
    count = 0
    try:
        for param in model.parameters():
            param.requires_grad_(False)
        for _, layer in layers:
            layer.base_weight().requires_grad_(True)
            layer.base_weight().grad = None
        model.train()
        with model.disable_adapter(), torch.enable_grad():
            for batch in batches:
                outputs = model(**batch)
                loss = getattr(outputs, "loss", None)
                if loss is None:
                    raise UserInputError(
                        "LoRA-GA: the model returned no loss for a calibration batch; the batches need labels "
                        "(the task's collator adds them), so that the gradient of the loss can be estimated"
                    )
                loss.backward()
                count += 1
        if count == 0:
            raise UserInputError("LoRA-GA: no calibration batch was given; pass at least one batch of training data")
        for path, layer in layers:
            grad = layer.base_weight().grad
            if grad is None:
                raise UserInputError(f"LoRA-GA: {path} got no gradient from the loss; exclude it from target_modules")
            g = grad.detach().float() / count
            sums[path] = g.T if layer.transposed else g
    finally:
        for _, layer in layers:
            layer.base_weight().grad = None
        for name, param in model.named_parameters():
            if name in flags:
                param.requires_grad_(flags[name])
        model.train(was_training)
    return sums


@torch.no_grad()
def apply_lora_ga(model: nn.Module, grads: Mapping[str, Tensor], adapter_name: str = "default") -> None:
    """Set A, B from the gradients (module path -> G (out, in)) and rewrite every base weight."""
    settings = find("lora_ga").settings_of(model.peft_config[adapter_name])
    for path, layer in _ga_layers(model, adapter_name):
        weight = layer.canonical_weight()
        a, b = fn.lora_ga_factors(
            grads[path].to(weight.device), weight, layer.r[adapter_name], layer.scaling[adapter_name],
            settings["direction"], settings["scale"], settings["stable_gamma"], stable_rows=layer.base_weight().shape[0],
        )
        apply_factors(layer, adapter_name, a.to(weight.dtype), b.to(weight.dtype))  # PEFT rounds them to W's dtype first


@torch.no_grad()
def apply_factors(layer: nn.Module, adapter_name: str, a: Tensor, b: Tensor) -> None:
    """A, B <- ``a``, ``b`` and W <- W - s B A (:func:`functional.low_rank_residual`), recorded on the
    layer: LoRA-GA's start of one layer, and its restore on --resume."""
    weight = layer.canonical_weight()
    layer.lora_A[adapter_name].copy_(a)
    layer.lora_B[adapter_name].copy_(b)
    a, b = a.to(weight.device), b.to(weight.device)
    layer.base_weight().data.copy_(layer.to_raw(fn.low_rank_residual(weight, a, b, layer.scaling[adapter_name])))
    layer.record_base_rewrite(adapter_name, a, b)


def initialize_lora_ga_weights(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], adapter_name: str = "default") -> None:
    """LoRA-GA's start for adapter ``adapter_name`` of ``model`` (an AdapterModel built with
    ``init_lora_weights="lora_ga"``), from the gradients of ``batches`` (dicts of tensors on
    the model's device whose forward returns ``.loss``)."""
    config = model.peft_config.get(adapter_name)
    if config is None or getattr(config, "init_lora_weights", None) != "lora_ga":
        raise UserInputError(
            f"initialize_lora_ga_weights: adapter {adapter_name!r} was not built with init_lora_weights='lora_ga'; "
            "build the model with that init (and optionally lora_ga_config) first"
        )
    apply_lora_ga(model, estimate_gradients(model, batches, adapter_name), adapter_name)
