"""Effective rank of a learned adapter update, read from the saved PEFT-format tensors.

For each adapted layer the update dW (out x in, conv kernels flattened) is rebuilt from
its factors by PEFT's key names, and its effective rank is the number of singular values
that hold 99 % of its energy:

    k = min { k : sigma_1^2 + ... + sigma_k^2 >= 0.99 * sum_i sigma_i^2 }

The run's effective rank is the mean of k over its adapted layers. A LoRA of rank r can
reach at most r; AdaLoRA's pruned triplets lower it; LoHa (Hadamard of two rank-r
products) can reach r^2 and LoKr (a Kronecker product) rank(w1) * rank(w2).

    LoRA / DoRA   dW = B A                       (lora_B (out, r), lora_A (r, in))
    AdaLoRA       dW = B diag(E) A               (lora_E (r, 1))
    LoHa          dW = (w1_a w1_b) * (w2_a w2_b)  element-wise
    LoKr          dW = w1 kron w2                (each full, or a product _a _b)

The scale (alpha / r) does not change a rank and is left out. Layers saved in a form not
rebuilt here (LoHa / LoKr with Tucker cores) are skipped.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

ENERGY = 0.99
"""Share of sum(sigma^2) the counted singular values hold."""

_FACTORS = (
    "lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "lora_A", "lora_B", "lora_E",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_w1", "lokr_w2", "lokr_t2",
)


def energy_rank(singular_values: torch.Tensor, energy: float = ENERGY) -> int:
    """How many of the largest singular values hold ``energy`` of the squared total (0 for dW = 0)."""
    power = torch.sort(singular_values.double().abs(), descending=True).values ** 2
    total = float(power.sum())
    if total <= 0.0:
        return 0
    cumulative = torch.cumsum(power, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1


def _two_d(tensor: torch.Tensor) -> torch.Tensor:
    """(out, in, kh, kw) -> (out, in * kh * kw); vectors become columns."""
    tensor = tensor.double()
    return tensor.reshape(tensor.shape[0], -1) if tensor.dim() != 1 else tensor.reshape(-1, 1)


def _low_rank_singular_values(b: torch.Tensor, a: torch.Tensor, middle: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values of B @ M @ A through two QRs: an r x r SVD instead of an out x in one."""
    _, rb = torch.linalg.qr(b)
    _, ra = torch.linalg.qr(a.T)
    core = rb @ (middle if middle is not None else torch.eye(rb.shape[1], dtype=rb.dtype)) @ ra.T
    return torch.linalg.svdvals(core)


def layer_singular_values(factors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Singular values of one layer's dW from its factors (keys as in :data:`_FACTORS`)."""
    f = {k.removesuffix(".weight"): v for k, v in factors.items()}
    if "lora_embedding_A" in f and "lora_embedding_B" in f:
        f["lora_A"], f["lora_B"] = f["lora_embedding_A"], f["lora_embedding_B"]
    if "lora_A" in f and "lora_B" in f:
        a, b = _two_d(f["lora_A"]), _two_d(f["lora_B"])
        middle = torch.diag(f["lora_E"].double().reshape(-1)) if "lora_E" in f else None
        return _low_rank_singular_values(b, a, middle)
    if "hada_t1" in f or "hada_t2" in f or "lokr_t2" in f:
        return None
    if all(k in f for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        w1 = _two_d(f["hada_w1_a"]) @ _two_d(f["hada_w1_b"])
        w2 = _two_d(f["hada_w2_a"]) @ _two_d(f["hada_w2_b"])
        return torch.linalg.svdvals(w1 * w2)
    w1 = _product(f, "lokr_w1")
    w2 = _product(f, "lokr_w2")
    if w1 is not None and w2 is not None:
        # the singular values of a Kronecker product are the products of its factors' ones
        return torch.outer(torch.linalg.svdvals(w1), torch.linalg.svdvals(w2)).reshape(-1)
    return None


def _product(f: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    if name in f:
        return _two_d(f[name])
    if f"{name}_a" in f and f"{name}_b" in f:
        return _two_d(f[f"{name}_a"]) @ _two_d(f[f"{name}_b"])
    return None


def group_layers(names) -> dict[str, dict[str, str]]:
    """{module path: {factor: tensor key}} for the adapter factors among ``names``."""
    layers: dict[str, dict[str, str]] = defaultdict(dict)
    for key in names:
        for factor in _FACTORS:
            if key.endswith("." + factor):
                layers[key[: -len(factor) - 1]][factor] = key
                break
    return dict(layers)


def adapter_effective_rank(adapter_file: str | Path, energy: float = ENERGY) -> tuple[float, int] | None:
    """(mean effective rank over the adapted layers, number of layers) of a saved adapter;
    None when the file holds no layer this module can rebuild."""
    from safetensors import safe_open

    ranks = []
    with safe_open(str(adapter_file), framework="pt") as handle:
        for keys in group_layers(handle.keys()).values():
            values = layer_singular_values({factor: handle.get_tensor(key) for factor, key in keys.items()})
            if values is not None:
                ranks.append(energy_rank(values, energy))
    if not ranks:
        return None
    return sum(ranks) / len(ranks), len(ranks)
