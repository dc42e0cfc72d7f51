"""Quantized base layers (QLoRA): bitsandbytes' ``Linear4bit`` and ``Linear8bitLt``.

    y = Q(W) x + s * B (A x)         Q(W): the frozen 4-bit (NF4 / FP4) or int8 weight, run by bitsandbytes
                                     A, B: float32 adapter factors; their output is cast to the base's dtype

Both bitsandbytes classes subclass ``nn.Linear``, so :func:`~lora_cli.adapters.layers.layer_kind`
calls them linear; this module tells them apart and reads their weights as floats:

* :func:`quant_kind` / :func:`is_quantized`: which kind of quantized layer a module is
  (matched by class and module name: the engine never needs bitsandbytes to be installed
  to inspect a model, only to dequantize one).
* :func:`dequantize_weight`: the layer's weight as a float32 (out, in) tensor: NF4/FP4
  blocks (and double-quantized statistics) through ``bitsandbytes.functional.dequantize_4bit``,
  int8 rows times their absmax / 127.
* :func:`dequantize_model`: every quantized linear of a model replaced by an ``nn.Linear``
  holding the dequantized weight (adapter wrappers keep their adapters), and transformers'
  quantization marks removed, so that the model merges, casts and saves as a plain one.
* :func:`nf_dequantized` / :func:`int8_dequantized`: what bitsandbytes' NF4 (and NF2) and
  LLM.int8() quantizers make of a float weight, computed in torch (LoftQ starts from them).

A quantized weight is never written in place: merging an adapter into it would
re-quantize ``W + dW``, which loses most of the update and cannot be undone exactly.
``loracli merge`` dequantizes first and writes a full-precision model instead.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import sys

import torch
from torch import Tensor, nn

BNB_4BIT, BNB_8BIT = "bnb_4bit", "bnb_8bit"
_CLASSES = {"Linear4bit": BNB_4BIT, "Linear8bitLt": BNB_8BIT}
_INSTALL = "pip install 'loracli[quant]'"


def quant_kind(module: nn.Module) -> str | None:
    """``"bnb_4bit"``, ``"bnb_8bit"``, or None for a layer that is not bitsandbytes-quantized."""
    for cls in type(module).__mro__:
        kind = _CLASSES.get(cls.__name__)
        if kind is not None and cls.__module__.split(".")[0] == "bitsandbytes":
            return kind
    return None


def is_quantized(module: nn.Module) -> bool:
    return quant_kind(module) is not None


def _bnb():
    try:
        import bitsandbytes
    except ImportError as exc:  # the model holds bitsandbytes layers, so this is unusual
        raise ImportError(f"dequantizing a bitsandbytes layer needs the bitsandbytes package: {_INSTALL}") from exc
    return bitsandbytes


def dequantize_weight(module: nn.Module) -> Tensor:
    """The float32 (out, in) weight a quantized linear computes with."""
    kind = quant_kind(module)
    weight = module.weight
    if kind == BNB_4BIT:
        if getattr(weight, "quant_state", None) is None:  # a Params4bit not quantized yet (meta / original device)
            return weight.data.float()
        data, state = _standard_4bit(module)
        return _bnb().functional.dequantize_4bit(data, state).float()
    if kind == BNB_8BIT:
        if weight.dtype != torch.int8:  # has_fp16_weights=True keeps a float copy
            return weight.data.float()
        scb = getattr(module.state, "SCB", None)
        if scb is None:
            scb = getattr(weight, "SCB", None)
        if scb is None:
            raise ValueError(f"the int8 layer {module} has no scale statistics (SCB); it was never quantized")
        return weight.data.float() * (scb.float().view(-1, 1) / 127.0)
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantized layer")


def _standard_4bit(module: nn.Module):
    """(packed data, quant state) of a 4-bit layer in bitsandbytes' standard layout; a layer
    repacked for AVX512-BF16 (see :func:`keep_standard_cpu_layout`) is converted back from copies."""
    weight = module.weight
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        functional = _bnb().functional
        data, state = functional._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))  # noqa: SLF001
    return data, state


def plain_linear(module: nn.Module, dtype=None) -> nn.Linear:
    """An ``nn.Linear`` with ``module``'s dequantized weight (and its bias), on its device."""
    weight = dequantize_weight(module)
    dtype = dtype or weight.dtype
    bias = getattr(module, "bias", None)
    linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=bias.requires_grad)
    return linear


def quantized_paths(model: nn.Module) -> list[str]:
    """Module paths of every bitsandbytes-quantized linear in ``model``."""
    return [path for path, module in model.named_modules() if is_quantized(module)]


def dequantize_model(model: nn.Module, dtype=None) -> list[str]:
    """Replace every quantized linear by a plain one, in place; returns their paths.

    Adapter wrappers stay: their ``base_layer`` is replaced, so the adapters run (and merge)
    on the dequantized weight. A transformers model loses its quantization marks
    (``hf_quantizer``, ``config.quantization_config``, ``is_quantized``), so that
    ``save_pretrained`` writes a plain full-precision model.
    """
    paths = quantized_paths(model)
    for path in paths:
        model.set_submodule(path, plain_linear(model.get_submodule(path), dtype))
    if paths:
        forget_quantization(model)
    return paths


def forget_quantization(model: nn.Module) -> None:
    """Drop a transformers model's quantization marks (``hf_quantizer``, ``config.quantization_config``,
    ``is_quantized``) once its weights are plain tensors (dequantized here, or by transformers from a GGUF
    file), so that ``save_pretrained`` writes it as the full-precision model it now is."""
    for target in (model, getattr(model, "base_model", None)):
        if target is None or not isinstance(target, nn.Module):
            continue
        for attr in ("hf_quantizer", "quantization_method", "_weight_conversions"):
            if attr in vars(target):
                delattr(target, attr)
        config = getattr(target, "config", None)
        if config is not None and hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        if getattr(target, "is_quantized", False):
            with contextlib.suppress(AttributeError):  # a read-only property reads hf_quantizer, gone now
                target.is_quantized = False


# ------------------------------------------------------------------ the quantizers' math, in torch
BLOCK_SIZE = 64
"""Values per block of bitsandbytes' NormalFloat quantization (its default)."""

NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
"""The 16 NormalFloat-4 levels (QLoRA, appendix E; bitsandbytes' ``nf4`` code table)."""


def normal_float_levels(bits: int, offset: float = 0.9677083) -> Tensor:
    """2**bits NormalFloat levels in [-1, 1]: normal quantiles between 1 - offset and offset,
    2**(bits-1) negative and 2**(bits-1) - 1 positive ones plus an exact zero, normalised
    by the largest. NF4 is the table above; NF2 is [-1, 0, 0.3379, 1]."""
    if bits == 4:
        return torch.tensor(NF4_LEVELS, dtype=torch.float32)
    half = 2**bits // 2
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1, dtype=torch.float32)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half, dtype=torch.float32)[:-1].double())
    levels = torch.tensor(pos.tolist() + [0.0] + neg.tolist(), dtype=torch.float32).sort().values
    return levels / levels.max()


def nf_dequantized(weight: Tensor, bits: int, block_size: int = BLOCK_SIZE) -> Tensor:
    """quant-then-dequant of ``weight`` with blockwise NormalFloat: float32, same shape.

    Values are taken in row-major order in blocks of ``block_size``; a short last block is
    scaled by its own maximum (as bitsandbytes does).
    """
    levels = normal_float_levels(bits).to(weight.device)
    bounds = (levels[1:] + levels[:-1]) / 2  # a value goes to the nearest level
    flat = weight.reshape(-1).float()
    n = flat.numel()
    full = n - n % block_size
    parts = [flat[:full].reshape(-1, block_size)] + ([flat[full:].reshape(1, -1)] if full < n else [])
    out = []
    for blocks in parts:
        absmax = blocks.abs().max(dim=-1).values
        scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1)
        index = torch.bucketize(scaled, bounds)
        out.append((levels[index] * absmax.view(-1, 1)).reshape(-1))
    return torch.cat(out).reshape(weight.shape)


def int8_dequantized(weight: Tensor) -> Tensor:
    """Row-wise absmax int8 quant-then-dequant (LLM.int8(), from W in float16): float32."""
    half = weight.to(torch.float16)
    absmax = half.abs().max(dim=1).values.float()
    q = torch.round(half * (127.0 / absmax.unsqueeze(-1))).to(torch.int8)
    return q * absmax.view(-1, 1) * 7.874015718698502e-3  # 1 / 127, as bitsandbytes writes it



# ------------------------------------------------------------------ 4-bit layers on the CPU
def keep_standard_cpu_layout(model: nn.Module) -> int:
    """Keep bitsandbytes' standard 4-bit layout on the CPU; returns how many layers it changed.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit``'s weight the first
    time it runs in eval mode without gradients: the block scales are rounded to bfloat16
    and the layer computes in bfloat16 from then on, whatever its compute dtype. Evaluation
    would then compute something else than training did, a merge could not be verified
    against the adapted model, and the repacked weight no longer dequantizes as stored.
    """
    changed = 0
    for module in model.modules():
        if quant_kind(module) == BNB_4BIT and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def cpu_dequantizes_right(module: nn.Module) -> bool:
    """Whether bitsandbytes' kernel here dequantizes this 4-bit layer's stored weight as stored.

    bitsandbytes quantizes a weight in blocks over its flattened values; its native CPU
    dequantize kernel (0.50, on some CPUs) blocks each row instead, which gives other values
    whenever a row is not a multiple of the block size. The layer's own packed weight is
    dequantized twice by the same kernel: with the layer's (out, in) shape, and laid out as
    rows of exactly one block each (or one row, when the block size does not divide the
    weight), where row blocks and flattened blocks coincide. Any difference is the kernel's
    error on this layer's shape, whatever the data, quantization type or double quantization.
    """
    functional = _bnb().functional
    data, state = _standard_4bit(module)
    shape = torch.Size(state.shape)
    numel, blocksize = shape.numel(), int(state.blocksize)
    flat_state = copy.copy(state)  # only the shape changes; the tensors are shared, never written
    flat_state.shape = torch.Size((numel // blocksize, blocksize) if numel % blocksize == 0 else (1, numel))
    as_shaped = functional.dequantize_4bit(data, state)
    reference = functional.dequantize_4bit(data, flat_state).reshape(shape)
    return bool(torch.equal(as_shaped, reference))


def cpu_wrong_layers(model: nn.Module) -> list[tuple[str, int, int]]:
    """(path, in_features, blocksize) of every CPU 4-bit layer that :func:`cpu_dequantizes_right` fails.

    The kernel's error depends on the shape only, so one layer of each (shape, block size, type,
    double quantization) is checked and its verdict applies to the others."""
    wrong = []
    verdicts: dict[tuple, bool] = {}
    for path, module in model.named_modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if quant_kind(module) != BNB_4BIT or state is None or module.weight.device.type != "cpu":
            continue
        key = (tuple(state.shape), int(state.blocksize), state.quant_type, bool(state.nested))
        if key not in verdicts:
            verdicts[key] = cpu_dequantizes_right(module)
        if not verdicts[key]:
            wrong.append((path, int(module.in_features), int(state.blocksize)))
    return wrong


# ------------------------------------------------------------------ can this machine run it
_PROBED: dict[int, tuple[str, str] | None] = {}


def backend_refusal(bits: int) -> tuple[str, str] | None:
    """(what is wrong, the fix) when this machine cannot run ``bits``-bit bitsandbytes layers, else None.

    Without a CUDA GPU it runs a 4-bit (or 8-bit) layer on a tiny tensor once per process:
    bitsandbytes releases with a CPU backend pass, older ones (CUDA only) fail here, before
    any model is loaded.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        return ("needs the bitsandbytes package, which is not installed",
                f"{_INSTALL} (or remove model.quantization)")
    if torch.cuda.is_available():
        return None
    if bits not in _PROBED:
        _PROBED[bits] = _probe_cpu(bits)
    return _PROBED[bits]


def _probe_cpu(bits: int) -> tuple[str, str] | None:
    try:
        import bitsandbytes as bnb

        weight = torch.linspace(-1, 1, 8 * 64).reshape(8, 64)
        x = torch.ones(2, 64)
        if bits == 4:
            layer = bnb.nn.Linear4bit(64, 8, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(64, 8, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        layer.to("cpu")(x)
    except Exception as exc:  # any failure means: no usable CPU path in this install
        version = getattr(sys.modules.get("bitsandbytes"), "__version__", "?")
        return (
            f"needs a CUDA GPU: this machine has none, and bitsandbytes {version} cannot run {bits}-bit layers "
            f"on the CPU ({type(exc).__name__}: {str(exc)[:120]})",
            "run on a machine with a CUDA GPU, or upgrade bitsandbytes (0.50 runs 4-bit and 8-bit layers on "
            "the CPU: pip install -U 'loracli[quant]'), or remove model.quantization",
        )
    return None
