"""Pure math for combining task tensors (adapter weights or delta weights): no layers.

Each combination takes ``n`` same-shape tensors ``t_i`` and weights ``w_i``:

    linear          sum_i w_i t_i                                     (task arithmetic)
    magnitude_prune sum_i w_i top_k(t_i)                              keep the density-fraction largest |t|
    ties            disjoint mean of w_i top_k(t_i) over entries      TIES-Merging, arXiv:2306.01708
                    whose sign agrees with the elected sign
    dare_linear     sum_i w_i drop(t_i) / density                     DARE, arXiv:2311.03099
    dare_ties       TIES' sign election and disjoint mean on DARE's rescaled random drop

The elected sign is that of ``sum_i t_i`` ("total") or of ``sum_i sign(t_i)``
("frequency"), +1 on ties; the disjoint mean divides by how many tensors agree with it
(at least 1). DARE draws its keep-mask with ``torch.bernoulli`` on a tensor filled with
``density``, one call per tensor in order, so a seeded run is reproducible.

:func:`low_rank_factors` turns a combined delta back into LoRA factors by a truncated SVD.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

LINEAR_KINDS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Combinations applied to the A and B factors separately (all ranks must agree)."""
SVD_KINDS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
"""Combinations applied to the full delta weights, then factorised again by SVD."""
COMBINATION_TYPES = (*LINEAR_KINDS, "cat", *SVD_KINDS)
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
"""Base kinds (without ``_svd``) that read ``density``."""
SIGN_METHODS = ("total", "frequency")


def base_kind(combination_type: str) -> str:
    """``ties_svd`` -> ``ties``; ``svd`` -> ``linear``: the tensor combination an SVD kind applies."""
    if combination_type == "svd":
        return "linear"
    return combination_type.removesuffix("_svd")


def keep_largest(tensor: Tensor, density: float) -> Tensor:
    """Zero all but the ``int(density * numel)`` entries of largest magnitude."""
    if density >= 1:
        return tensor
    flat = tensor.reshape(-1)
    k = int(density * flat.numel())
    keep = torch.zeros_like(flat)
    keep[flat.abs().topk(k).indices] = 1
    return tensor * keep.view(tensor.shape)


def drop_random(tensor: Tensor, density: float) -> Tensor:
    """DARE: keep each entry with probability ``density``, rescale the kept by 1 / density."""
    if density >= 1:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density))
    return tensor * keep / density


def elected_sign_mask(stacked: Tensor, method: str) -> Tensor:
    """(n, ...) bool: where each tensor's sign agrees with the elected one."""
    signs = stacked.sign()
    votes = stacked.sum(0) if method == "total" else signs.sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return signs == elected


def _weighted(stacked: Tensor, weights: Tensor) -> Tensor:
    return stacked * weights.to(stacked).view(-1, *[1] * (stacked.dim() - 1))


def combine_tensors(
    kind: str,
    tensors: list[Tensor],
    weights: list[float] | Tensor,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> Tensor:
    """Combine same-shape ``tensors`` with ``weights`` by ``kind`` (one of :data:`LINEAR_KINDS`)."""
    weights = torch.as_tensor(weights, dtype=torch.float32)
    if kind != "linear":
        if density is None:
            raise ValueError(f"combination {kind!r} needs a density in [0, 1]")
        if density < 0:
            raise ValueError(f"density must be >= 0, got {density}")
        if density >= 1:
            warnings.warn(f"density {density} >= 1: nothing is pruned", stacklevel=2)
    if kind in ("ties", "magnitude_prune"):
        tensors = [keep_largest(t, density) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [drop_random(t, density) for t in tensors]
    elif kind != "linear":
        raise ValueError(f"unknown tensor combination {kind!r}; use one of {', '.join(LINEAR_KINDS)}")
    stacked = torch.stack(tensors)
    weighted = _weighted(stacked, weights)
    if kind in ("ties", "dare_ties"):
        agree = elected_sign_mask(stacked, majority_sign_method)
        return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)
    return weighted.sum(0)


def low_rank_factors(
    delta: Tensor,
    rank: int,
    clamp: float | None = None,
    full_matrices: bool = True,
    driver: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(A, B) with ``B @ A`` the best rank-``rank`` approximation of the 2-D ``delta`` (out, in);
    at most min(out, in) rows / columns.

    B = U_r diag(S_r) (out, r), A = V_r^T (r, in). ``clamp``: a quantile q in (0, 1]; every
    entry of A and B is clamped to [-v, v] with v the q-quantile of their joint entries.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, s.numel())  # a rank above min(out, in) adds nothing: the caller pads with zeros
    b = u[:, :k] * s[:k]  # (out, k)
    a = vh[:k, :]  # (k, in)
    if clamp is not None:
        limit = torch.quantile(torch.cat([b.reshape(-1), a.reshape(-1)]), clamp)
        b, a = b.clamp(-limit, limit), a.clamp(-limit, limit)
    return a, b
