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


@torch.no_grad()
def random_init(a: Tensor, b: Tensor, init: bool | str, r: int) -> None:
    """The random starts, in place: A kaiming-uniform (``"gaussian"``: normal, std 1/r); B zero,
    or kaiming-uniform too for ``init=False`` (a non-zero update from the first step)."""
    if init == "gaussian":
        nn.init.normal_(a, std=1 / r)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    if init is False:
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    else:
        nn.init.zeros_(b)


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


def low_rank_residual(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """W - s B A in float32, cast back to W's dtype: the base weight an init like PiSSA leaves.

    Every init of that family (PiSSA, OLoRA, CorDA, LoRA-GA) and the exact restore of a
    recorded start (``--resume``) go through this one expression, so both give the same bits.
    """
    return (weight.float() - scaling * (lora_b.float() @ lora_a.float())).to(weight.dtype)


def mica_factors(weight: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """MiCA (arXiv:2604.01694): A = 0 (r, in), B = the r left singular vectors of W with the
    smallest singular values (out, r). B stays frozen; only A trains, so W is untouched."""
    if r > min(weight.shape):
        raise ValueError(f"MiCA needs r <= min(out, in) = {min(weight.shape)} for a weight of shape {tuple(weight.shape)}, got r={r}")
    u, _, _ = torch.linalg.svd(weight.float(), full_matrices=False)
    return torch.zeros(r, weight.shape[1], dtype=torch.float32, device=weight.device), u[:, -r:].contiguous()


LORA_GA_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def lora_ga_factors(
    grad: Tensor, weight: Tensor, r: int, scaling: float, direction: str = "ArB2r", scale: str = "stable",
    stable_gamma: float = 16, stable_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """LoRA-GA (arXiv:2407.05000): A and B from the top 2r singular triplets of the averaged
    gradient G (out, in) of the loss with respect to W, so that the first step of LoRA
    follows full fine-tuning's gradient.

    G ~ U S V^T (randomised SVD, q = min(4r, min(G.shape)), 4 power iterations). ``direction``
    picks which r of the 2r components go to A (rows of V^T) and which to B (columns of U,
    times their singular values): "ArB2r" A = V^T[:r], B = U[:, r:2r] S[r:2r]; "A2rBr" the
    reverse; "ArBr" odd rows to A, even columns to B; "random" one random r-subset for both.
    ``scale``: "stable" B *= out^(1/4) / sqrt(gamma); "weight_svd" B *= sigma_1(W) / S_B[0];
    "gd_scale" A /= s and B /= s; "unit" nothing. W then becomes W - s B A
    (:func:`low_rank_residual`). ``stable_rows``: the row count "stable" uses, out by
    default (PEFT 0.21 takes the stored weight's first dim: ``in`` for GPT-2's Conv1D).
    Returns float32 (A (r, in), B (out, r)).
    """
    g = grad.float()
    u, s_vals, v = torch.svd_lowrank(g, q=min(4 * r, min(g.shape)), niter=4)
    vh = v.T
    u, s_vals, vh = u[:, : 2 * r], s_vals[: 2 * r], vh[: 2 * r]
    if direction == "ArBr":
        a, b_idx = vh[1 : 2 * r : 2], slice(0, 2 * r, 2)
        s_b, b = s_vals[b_idx], u[:, b_idx]
    elif direction == "A2rBr":
        a, s_b, b = vh[r : 2 * r], s_vals[:r], u[:, :r]
    elif direction == "ArB2r":
        a, s_b, b = vh[:r], s_vals[r : 2 * r], u[:, r : 2 * r]
    elif direction == "random":
        pick = torch.randperm(2 * r)[:r]
        a, s_b, b = vh[pick], s_vals[pick], u[:, pick]
    else:
        raise ValueError(f"unknown LoRA-GA direction {direction!r}; use one of {', '.join(LORA_GA_DIRECTIONS)}")
    b = b @ torch.diag(s_b)
    if scale == "stable":
        rows = weight.shape[0] if stable_rows is None else stable_rows
        b = b * (rows**0.25 / stable_gamma**0.5)
    elif scale == "weight_svd":
        _, w_s, _ = torch.svd_lowrank(weight.float(), q=r, niter=4)
        if s_b[0] > 0:
            b = b * (w_s[0] / s_b[0])
    elif scale == "gd_scale":
        a, b = a / scaling, b / scaling
    elif scale != "unit":
        raise ValueError(f"unknown LoRA-GA scale {scale!r}; use one of {', '.join(LORA_GA_SCALES)}")
    return a.contiguous(), b.contiguous()


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
