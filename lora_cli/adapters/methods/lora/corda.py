"""CorDA: context-oriented decomposition adaptation (Yang et al., arXiv:2406.05223).

A data-driven LoRA start that rewrites the base weight. For each adapted layer the
covariance C of its inputs over calibration batches is collected (each batch's rows
scaled by 1 / |max|), damped until it inverts well, and the weight decomposed in the
context of the data:

    W C = U S V^T,   V~ = (V^T C^-1)^T
    IPM (instruction-previewed): the r largest components   -> adapt what the task uses
    KPM (knowledge-preserved):   the r smallest components  -> keep what the base knows
    A = sqrt(S_r / s) V~_r^T,   B = U_r sqrt(S_r / s),   W <- W - s B A

so the model's output is unchanged at the start. ``corda_config`` takes PEFT's fields:
``corda_method`` (ipm | kpm), ``covariance_file`` (covariances saved / reused: a torch file
{module path: (in, in)}), ``cache_file`` (the cropped decomposition saved / reused, keys
``<path>.eigens.S_WC`` / ``U_WC`` / ``V_WC``), ``use_float16_for_covariance``, ``verbose`` and
``prune_temporary_fields`` (accepted for PEFT's files; there are no temporary fields here).

In the engine the adapter is injected first (with a zero delta), then

    preprocess_corda(model, batches)        # hooks the adapted layers, decomposes, initialises

The covariance is a mean over samples, C = mean_i X_i^T X_i / max(X_i)^2, each sample's
real token rows X_i (``attention_mask``: padding left out) scaled by that sample's own max:
what PEFT's hooks compute from one unpadded sample per forward. Calibration batches of
several padded rows therefore give PEFT's covariances (equal up to float rounding).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lora_cli import atomic
from lora_cli.adapters.methods.lora.passes import (
    Forward,
    calibrated_layers,
    check_adapter,
    forward_batch,
    token_mask,
)
from lora_cli.adapters.methods.lora.starts import find
from lora_cli.errors import LoraCliError, UserInputError


# --------------------------------------------------------------------- covariances
@torch.no_grad()
def collect_covariances(
    model: nn.Module,
    batches: Iterable[Any],
    adapter_name: str = "default",
    forward: Forward | None = None,
    float16: bool = False,
) -> dict[str, Tensor]:
    """{module path: mean over samples of X^T X / max(X)^2} of each adapted layer's inputs,
    with the adapters off (the base model's activations). A sample is one row of a batch
    (its real tokens, per the attention mask), scaled by its own max, as in PEFT's run of one
    sample per forward."""
    forward = forward or forward_batch
    layers = calibrated_layers(model, adapter_name)
    sums: dict[str, Tensor | float] = dict.fromkeys((p for p, _ in layers), 0.0)
    counts = dict.fromkeys(sums, 0)
    state: dict[str, Any] = {"mask": None}

    def hook_for(path):
        def hook(module, args, output):
            x, real = sample_rows(args, state["mask"])  # (samples, tokens, in), (samples, tokens)
            if x.shape[0] == 0:
                return
            x = x.detach() if float16 else x.detach().float()
            if real is None:  # every token real (no padding in this batch)
                x = x / x.amax(dim=(1, 2)).abs().view(-1, 1, 1)  # PEFT's max(X).abs(), per sample
            else:
                real = real.unsqueeze(-1)
                low = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
                peak = torch.where(real, x, low).amax(dim=(1, 2)).abs()
                x = torch.where(real, x / peak.view(-1, 1, 1), torch.zeros((), dtype=x.dtype, device=x.device))
            if not torch.isfinite(x).all():
                raise LoraCliError(f"CorDA: the inputs of {path} hold NaN/inf (or are all zero); check the calibration data")
            flat = x.reshape(-1, x.shape[-1])  # padding rows are zero: they add nothing
            sums[path] = sums[path] + flat.T @ flat
            counts[path] += x.shape[0]
        return hook

    handles = [layer.register_forward_hook(hook_for(path)) for path, layer in layers]
    training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            for batch in batches:
                state["mask"] = token_mask(batch, None)
                forward(model, batch)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    empty = [p for p, n in counts.items() if n == 0]
    if empty:
        raise UserInputError(f"CorDA: {', '.join(empty[:5])} saw no calibration input; give it at least one batch "
                             "(adapter.calibration_batches) that runs through these layers")
    return {p: sums[p] / counts[p] for p in sums}


def sample_rows(x: Any, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """A layer's input as (samples, tokens, in) with a (samples, tokens) bool of the real
    tokens (the attention mask), None when every token is real; samples with no real token
    dropped. A 2-d input (batch, in) is one token per sample."""
    if isinstance(x, (tuple, list)):
        x = x[0]
    if mask is None or x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return (x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() >= 2 else x.reshape(1, 1, -1)), None
    real = mask.to(x.device).bool()
    if real.all():
        return x, None
    keep = real.any(dim=1)
    return x[keep], real[keep]


def decompose(weight: Tensor, covariance: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, V~) of W C, the damping doubled from 1% of mean(diag C) until C + damp is
    inverted to within 0.05 (Frobenius) of the identity. W: (out, in), C: (in, in)."""
    w = weight.float()
    c = covariance.float()
    eye = torch.eye(c.shape[0], device=c.device)
    damp = 0.01
    for _ in range(64):
        fixed = c + eye * torch.mean(torch.diag(c)) * damp
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    else:
        raise LoraCliError("CorDA: the input covariance could not be inverted; give more (or more varied) calibration data")
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    return u, s, (vh @ inverse).T


def crop(u: Tensor, s: Tensor, v: Tensor, r: int, method: str) -> tuple[Tensor, Tensor, Tensor]:
    """The r largest (ipm) or r smallest (kpm) components."""
    part = slice(None, r) if method == "ipm" else slice(-r, None)
    return s[part].clone(), u[:, part].clone(), v[:, part].clone()


@torch.no_grad()
def apply_factors(layer: nn.Module, adapter_name: str, a: Tensor, b: Tensor) -> None:
    """Set A and B of ``adapter_name`` and W <- W - (s B) A (in float32, stored in W's dtype: PEFT's
    CorDA expression, bit for bit), recorded on the layer: the start, and its restore on --resume."""
    layer.lora_A[adapter_name].copy_(a)
    layer.lora_B[adapter_name].copy_(b)
    weight = layer.canonical_weight()
    residual = weight.float() - (layer.scaling[adapter_name] * b.float()) @ a.float()
    layer.base_weight().data.copy_(layer.to_raw(residual).to(weight.dtype))
    # recorded: the adapter is saved relative to the original base, see lora_cli.adapters.methods.lora.base_rewrites
    layer.record_base_rewrite(adapter_name, a, b)


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    batches: Sequence[Any] | Iterable[Any] | None,
    adapter_name: str = "default",
    forward: Forward | None = None,
) -> dict[str, int]:
    """CorDA start for ``adapter_name`` (created with ``init_lora_weights="corda"``): the
    covariances from ``batches`` (or ``covariance_file``), the decomposition (or
    ``cache_file``), then A, B and the residual base weights. Returns {module path: rank}."""
    config = check_adapter(model, adapter_name, "corda", "preprocess_corda")
    settings = find("corda").settings_of(config)
    layers = calibrated_layers(model, adapter_name)
    device = next(model.parameters()).device
    eigens = _load_cache(settings["cache_file"], layers, device)
    if eigens is None:
        covariances = _load_covariances(settings["covariance_file"], layers, device)
        if covariances is None:
            if batches is None:
                raise UserInputError("CorDA needs calibration batches when neither corda_config.cache_file nor "
                                     "corda_config.covariance_file holds a saved result")
            covariances = collect_covariances(model, batches, adapter_name, forward, settings["use_float16_for_covariance"])
            if settings["covariance_file"]:
                _save(settings["covariance_file"], covariances)
        eigens = {}
        for path, layer in layers:
            u, s, v = decompose(layer.canonical_weight(), covariances[path])
            eigens[path] = crop(u, s, v, layer.r[adapter_name], settings["corda_method"])
        if settings["cache_file"]:
            _save(settings["cache_file"], {f"{p}.eigens.{k}": t for p, (s, u, v) in eigens.items()
                                           for k, t in (("S_WC", s), ("U_WC", u), ("V_WC", v))})
    ranks = {}
    for path, layer in layers:
        s, u, v = (t.to(device) for t in eigens[path])
        r = layer.r[adapter_name]
        if s.shape != (r,) or u.shape != (layer.out_features, r) or v.shape != (layer.in_features, r):
            raise UserInputError(
                f"CorDA: the saved decomposition of {path} is for another layer shape or rank (S {tuple(s.shape)}, "
                f"U {tuple(u.shape)}, V {tuple(v.shape)}; the layer is ({layer.out_features}, {layer.in_features}) at "
                f"r={r}); delete corda_config.cache_file or train with the rank it was built for"
            )
        if not all(torch.isfinite(t).all() for t in (s, u, v)):
            raise LoraCliError(f"CorDA: the decomposition of {path} holds NaN/inf; check the calibration data")
        s = s / layer.scaling[adapter_name]
        a = v.T * s.sqrt().view(-1, 1)  # (r, in)
        b = u * s.sqrt()  # (out, r)
        apply_factors(layer, adapter_name, a.contiguous(), b.contiguous())
        ranks[path] = r
    return ranks


def _load_cache(path, layers, device) -> dict[str, tuple[Tensor, Tensor, Tensor]] | None:
    data = _load(path, device)
    if data is None:
        return None
    try:
        return {p: tuple(data[f"{p}.eigens.{k}"] for k in ("S_WC", "U_WC", "V_WC")) for p, _ in layers}
    except KeyError as exc:
        raise UserInputError(f"CorDA: corda_config.cache_file {path} has no entry {exc}; it was built for another "
                             "model or other target modules; delete it to rebuild it") from None


def _load_covariances(path, layers, device) -> dict[str, Tensor] | None:
    data = _load(path, device)
    if data is None:
        return None
    missing = [p for p, _ in layers if p not in data]
    if missing:
        raise UserInputError(f"CorDA: corda_config.covariance_file {path} has no covariance for {', '.join(missing[:3])}; "
                             "it was built for another model or other target modules; delete it to rebuild it")
    return {p: data[p] for p, _ in layers}


def _load(path: str | None, device) -> dict[str, Tensor] | None:
    if not path or not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserInputError(f"CorDA: cannot read {path} ({type(exc).__name__}: {exc}); delete it to rebuild it") from None
    if not isinstance(data, dict):
        raise UserInputError(f"CorDA: {path} does not hold a mapping of tensors; delete it to rebuild it")
    return data


def _save(path: str, tensors: dict[str, Tensor]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_file(path) as tmp:
        torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
