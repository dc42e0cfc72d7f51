"""Pure tensor math of the adapter methods: no layers, no state.

Weights here are in the *canonical* layout ``(out, in)`` for linear maps and
``(out, in, kh, kw)`` for convolutions; layers transpose for GPT-2's Conv1D and for
embeddings, whose stored weights are ``(in, out)``.

Everything is usable on a bare state dict: ``lora_delta(A, B, s)`` gives what merging
adds to a weight.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------- LoRA


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (arXiv:2312.03732)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_delta(lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """Delta weight of LoRA: B @ A * s.

    ``lora_a`` is (r, in) or a conv kernel (r, in, *kernel); ``lora_b`` is (out, r) or
    (out, r, 1, ...). Returns (out, in) or (out, in, *kernel). (A grouped conv's B,
    (out, r / groups, 1, ...), has no such delta: see ``LoraLayer``.)
    """
    if lora_a.dim() > 2:
        out = lora_b.shape[0]
        delta = lora_b.reshape(out, -1) @ lora_a.reshape(lora_a.shape[0], -1)
        return delta.reshape(out, *lora_a.shape[1:]) * scaling
    return (lora_b @ lora_a) * scaling


def grouped_lora_weight(lora_a: Tensor, lora_b: Tensor, weight_shape: tuple[int, ...]) -> Tensor:
    """PEFT 0.21's "LoRA weight" of a grouped conv, which DoRA's norm reads there.

    B (out, r / G, 1, ...) is read as a (out / G, r) matrix and A (r, in, *kernel) as
    (r, in * kernel), and their product is laid out as the grouped weight (out, in / G,
    *kernel). It is not the adapter's update (that is dense across groups and fits no
    grouped kernel); it only fixes what a DoRA magnitude in a PEFT file is relative to.
    """
    r = lora_a.shape[0]
    return (lora_b.reshape(-1, r) @ lora_a.reshape(r, -1)).reshape(weight_shape)


def dropout_rescale_folded(x: Tensor, dropout: nn.Module, scaling: float) -> tuple[Tensor, float]:
    """``dropout(x)`` without its 1 / (1 - p) rescale, and ``scaling`` that carries it instead.

    LoRA's dropped input only feeds linear maps, so mask * x / (1 - p) through A and s B equals
    mask * x through A and (s / (1 - p)) B: the rescale lands on the tiny B, not on x.
    On CPU the keep-mask comes from raw 64-bit random words, two 32-bit uniforms each, kept
    when >= a threshold (P(keep) = 1 - p to within 2**-32): about 3x cheaper than the
    ``bernoulli_`` behind F.dropout (see bench/README.md).
    """
    if not (isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0):
        return x, scaling
    p = dropout.p
    if x.device.type != "cpu" or p >= 1 or torch.compiler.is_compiling():
        return dropout(x), scaling  # compiled, dropout fuses into the kernels (random_ would break the graph)
    n = x.numel()
    words = torch.empty((n + 1) // 2, dtype=torch.int64).random_(-(2**63), None)
    keep = words.view(torch.int32)[:n].view(x.shape) >= round(p * 2**32) - 2**31
    return x * keep.to(x.dtype), scaling / (1 - p)


def add_low_rank(result: Tensor, h: Tensor, b: Tensor) -> Tensor:
    """``result + h @ b.T`` as one addmm, without a full-size temporary, when dtypes agree."""
    if result.dtype != h.dtype:
        return result + F.linear(h, b).to(result.dtype)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), b.T)
    return out.view(result.shape)


def conv(x: Tensor, weight: Tensor, **kwargs) -> Tensor:
    """``F.conv1d``, ``F.conv2d`` or ``F.conv3d``, picked by the kernel's rank: (out, in, *kernel)."""
    op = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
    return op(x, weight, **kwargs)


def row_norm(weight: Tensor) -> Tensor:
    """L2 norm of every output row: (out, ...) -> (out,). DoRA's ||W||."""
    return weight.reshape(weight.shape[0], -1).norm(p=2, dim=1)


def pissa_factors(weight: Tensor, r: int, scaling: float, niter: int | None = None) -> tuple[Tensor, Tensor]:
    """PiSSA (arXiv:2404.02948): A, B from the top-r singular triplets of W.

    A = diag(sqrt(S_r / s)) Vh_r, B = U_r diag(sqrt(S_r / s)), so s * B @ A is the rank-r
    principal part of W. ``niter`` switches to a randomised low-rank SVD (fast, approximate).
    """
    w = weight.float()
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        vh = v.T
    root = torch.sqrt(s / scaling)
    return root[:, None] * vh, u * root[None, :]


def olora_factors(weight: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """OLoRA (arXiv:2406.01775): W = QR; A = R[:r], B = Q[:, :r]."""
    q, rr = torch.linalg.qr(weight.float())
    return rr[:r].contiguous(), q[:, :r].contiguous()


def orthogonal_factors(in_features: int, out_features: int, r: int, generator=None) -> tuple[Tensor, Tensor]:
    """Non-zero A and B with B @ A = 0: they draw from orthogonal halves of one basis.

    Q is a random r x r orthogonal matrix; A lives in the span of its even rows, B of its
    odd rows, so the adapter starts exactly at the base model but both factors train.
    """
    if r % 2:
        raise ValueError(f"orthogonal init needs an even rank, got r={r}")
    q, _ = torch.linalg.qr(torch.randn(r, r, generator=generator))
    even, odd = q[0::2], q[1::2]  # (r/2, r) each, even @ odd.T == 0
    a = even.T @ torch.randn(r // 2, in_features, generator=generator) / math.sqrt(in_features)
    b = torch.randn(out_features, r // 2, generator=generator) @ odd / math.sqrt(r)
    return a, b


_PISSA_NITER = re.compile(r"pissa_niter_(\d+)")


def parse_pissa_niter(init: object) -> int | None:
    """'pissa_niter_4' -> 4; anything else -> None."""
    match = _PISSA_NITER.fullmatch(init) if isinstance(init, str) else None
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- LoHa


def loha_delta(w1_a: Tensor, w1_b: Tensor, w2_a: Tensor, w2_b: Tensor, scale: float) -> Tensor:
    """LoHa (arXiv:2108.06098): (w1_a @ w1_b) * (w2_a @ w2_b) * scale, a Hadamard product."""
    return (w1_a @ w1_b) * (w2_a @ w2_b) * scale


def tucker_weight(core: Tensor, w_a: Tensor, w_b: Tensor) -> Tensor:
    """A conv kernel from a Tucker core ("effective conv2d" of LyCORIS).

    core (r, r, kh, kw), w_a (r, out), w_b (r, in) -> (out, in, kh, kw):
    W[p, q] = sum_ij w_a[i, p] core[i, j] w_b[j, q].
    """
    return torch.einsum("ijkl,ip,jq->pqkl", core, w_a, w_b)


def loha_delta_cp(t1: Tensor, w1_a: Tensor, w1_b: Tensor, t2: Tensor, w2_a: Tensor, w2_b: Tensor, scale: float) -> Tensor:
    """LoHa on a conv kernel with Tucker cores: tucker(t1, w1) * tucker(t2, w2) * scale.

    t (r, r, kh, kw); w_a (r, out); w_b (r, in). Returns (out, in, kh, kw).
    """
    return tucker_weight(t1, w1_a, w1_b) * tucker_weight(t2, w2_a, w2_b) * scale


def rank_dropout_mask(rows: int, p: float, rescale: bool, like: Tensor) -> Tensor:
    """Keep-mask over the ``rows`` output rows of a delta, each dropped with probability p.

    ``rescale`` divides by the kept fraction (as LoHa always does and LoKr does with
    rank_dropout_scale), so the expected delta is unchanged.
    """
    mask = (torch.rand(rows, device=like.device) > p).to(like.dtype)
    if rescale:
        mask = mask / mask.mean().clamp_min(1 / rows)
    return mask


# --------------------------------------------------------------------------- LoKr


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into (m, n) with m * n == dimension.

    With ``factor`` > 0 dividing ``dimension``: (factor, dimension // factor) in that order,
    even when factor is the larger one (PEFT and LyCORIS do not sort it; 32 with factor 8
    -> (8, 4)). Otherwise the divisor pair closest to sqrt(dimension), or the one with
    m <= factor: 768 -> (24, 32), 256 -> (16, 16), 127 -> (1, 127).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
        length = m + n
    return (m, n) if m <= n else (n, m)


def kron_delta(w1: Tensor, w2: Tensor, scale: float) -> Tensor:
    """LoKr (arXiv:2309.14859): kron(w1, w2) * scale; w2 may carry conv kernel dims."""
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2) * scale


def kron_apply(x: Tensor, w1: Tensor, w2: Tensor, scale: float) -> Tensor:
    """x @ kron(w1, w2).T * scale without building the Kronecker product.

    w1 (out_l, in_m), w2 (out_k, in_n); x (..., in_m * in_n) -> (..., out_l * out_k).
    With X the (in_m, in_n) view of one input row, kron(w1, w2) vec(X) = vec(w1 X w2^T):
    two small matmuls instead of one (out x in) matmul plus building the delta.
    """
    out_l, in_m = w1.shape
    out_k, in_n = w2.shape
    lead = x.shape[:-1]
    h = x.reshape(-1, in_m, in_n) @ w2.T  # (N, in_m, out_k)
    h = (w1 * scale) @ h  # (N, out_l, out_k)
    return h.reshape(*lead, out_l * out_k)


# ------------------------------------------------------------------------ AdaLoRA


def adalora_delta(lora_a: Tensor, lora_b: Tensor, lora_e: Tensor, scaling: float, ranknum: float) -> Tensor:
    """AdaLoRA (arXiv:2303.10512): P diag(E) Q * scaling / (ranknum + 1e-5)."""
    return lora_b @ (lora_a * lora_e) * scaling / (ranknum + 1e-5)


def orthogonality_penalty(matrix: Tensor, rows: bool = True) -> Tensor:
    """||P P^T - I||_F for the rows of P (rows=True) or P^T P for its columns."""
    gram = matrix @ matrix.T if rows else matrix.T @ matrix
    eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
    return torch.linalg.norm(gram - eye, ord="fro")
