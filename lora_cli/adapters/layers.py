"""The base adapter layer: forward = base(x) + delta(x), merge/unmerge, enable/disable.

::

    x ──► base_layer ───────────────┐
    │                               (+) ──► y        merged: y = base'(x), base' = W + ΔW
    └──► method's delta(x) ─────────┘

A method subclass supplies only its parameters (``add``) and its math
(``get_delta_weight``, optionally a cheaper ``delta_forward``). This class owns the rest:
which adapters are active, folding the delta into the weight, safe merging with a
finiteness check, idempotent merge/unmerge, and naming tensors for the PEFT file format.

Layouts: methods work in the *canonical* layout, (out, in) or (out, in, *kernel). GPT-2's
``Conv1D`` and ``nn.Embedding`` store (in, out); :meth:`to_raw` / :meth:`canonical_weight`
convert, which is all that ``fan_in_fan_out`` means.

:class:`~lora_cli.adapters.modules_to_save.ModulesToSaveWrapper` is the other wrapper a model
gets: a module trained in full.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_cli.adapters import quantized
from lora_cli.adapters.kinds import (
    CONV2D,
    CONV3D,
    CONVS,
    EMBEDDING,
    HF_CONV1D,
    LINEAR,
    MHA,
    TORCH_CONV1D,
)
from lora_cli.errors import LoraCliError

if TYPE_CHECKING:
    from lora_cli.adapters.config import AdapterConfig

HALF_DTYPES = (torch.float16, torch.bfloat16)


def rows_of(names: list[str], name: str, device: torch.device) -> Tensor:
    """The indices of the rows that ``names`` (one adapter name per row) gives to ``name``."""
    return torch.tensor([i for i, n in enumerate(names) if n == name], device=device)


def layer_kind(module: nn.Module) -> str | None:
    """The kind of base layer, or None when no adapter can wrap it."""
    if isinstance(module, nn.Linear):
        return LINEAR
    # transformers' Conv1D (GPT-2): weight stored (in, out); matched by shape, not import.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return HF_CONV1D
    if isinstance(module, nn.Conv2d):
        return CONV2D
    if isinstance(module, nn.Conv1d):
        return TORCH_CONV1D
    if isinstance(module, nn.Conv3d):
        return CONV3D
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if isinstance(module, nn.MultiheadAttention):
        return MHA
    return None


FREE_RANK = 1024
"""Ranks up to this fit any layer (PEFT takes r=8 on a 4-wide layer, and so do tests on tiny models)."""


def rank_refusal(module: nn.Module, r: int) -> str | None:
    """Why rank ``r`` is too large for the layer ``module`` (wrapped or not), or None when it fits.

    The update of a (out, in) layer has rank at most min(in, out); past max(in, out) an adapter
    would hold more numbers than the layer itself. That bound (never below :data:`FREE_RANK`),
    checked before any tensor is made, keeps a config's rank (65536 at most,
    :data:`~lora_cli.adapters.checks.MAX_RANK`) from asking a small layer for gigabytes.
    """
    base = module.base_layer if isinstance(module, AdapterLayer) else module
    kind = layer_kind(base)
    if kind == LINEAR:
        inputs, outputs = base.in_features, base.out_features
    elif kind == HF_CONV1D:
        inputs, outputs = base.weight.shape
    elif kind == EMBEDDING:
        inputs, outputs = base.num_embeddings, base.embedding_dim
    elif kind == MHA:
        inputs, outputs = base.embed_dim, 3 * base.embed_dim
    elif kind in CONVS:
        inputs, outputs = base.weight[0].numel(), base.out_channels  # in / groups * kernel
    else:
        return None
    if r <= max(inputs, outputs, FREE_RANK):
        return None
    return (f"r={r} is larger than the layer ({inputs} inputs, {outputs} outputs): its update has rank at most "
            f"{min(inputs, outputs)}, so a larger r only costs memory (this layer takes r <= "
            f"{max(inputs, outputs, FREE_RANK)}); use r <= {min(inputs, outputs)} for it (rank_pattern sets one "
            "layer's rank)")


class AdapterLayer(nn.Module):
    """Wraps one base module and holds any number of named adapters of one method."""

    supported_kinds: ClassVar[tuple[str, ...]] = (LINEAR, HF_CONV1D, CONV2D)
    adapter_attrs: ClassVar[tuple[str, ...]] = ()
    """Names of the ``nn.ParameterDict`` containers keyed by adapter name."""
    disk_names: ClassVar[dict[str, str]] = {}
    """attr -> key suffix in the PEFT file, where they differ (``lora_A`` -> ``lora_A.weight``)."""
    wraps_quantized: ClassVar[bool] = False
    """Whether this method runs on bitsandbytes 4-bit / 8-bit linears (see :mod:`.quantized`)."""
    base_key: ClassVar[str] = "base_layer"
    """Where PEFT's files put the wrapped module's own tensors (``P.base_layer.weight``), when a
    file carries them (``save_embedding_layers``)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        kind = layer_kind(base_layer)
        if kind not in self.supported_kinds:
            raise LoraCliError(f"{type(self).__name__} cannot wrap {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.kind = kind
        for attr in self.adapter_attrs:
            setattr(self, attr, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.batch_adapters: list[str] | None = None
        """One adapter name per row while a mixed batch runs (set by the model), else None."""
        weight = self.base_weight()
        if kind == LINEAR:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        elif kind in (HF_CONV1D, EMBEDDING):
            self.in_features, self.out_features = weight.shape[0], weight.shape[1]
        elif kind == MHA:
            self.out_features, self.in_features = weight.shape  # (3 * dim, dim)
        else:
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels

    def __getattr__(self, name: str) -> Any:
        # Models read attributes of their layers (``projection.weight.dtype``, ``.nf``):
        # anything the wrapper lacks comes from the base layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    @property
    def quant_kind(self) -> str | None:
        """``"bnb_4bit"`` / ``"bnb_8bit"`` while the base layer is quantized, else None."""
        return quantized.quant_kind(self.base_layer)

    # --------------------------------------------------------------- subclass API
    kind_of = staticmethod(layer_kind)
    """The kind of ``module``: :func:`layer_kind` (the method table asks it without importing torch)."""

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return cls.refusal(module) is None

    @classmethod
    def refusal(cls, module: nn.Module) -> str | None:
        """Why this method cannot wrap ``module`` (with the fix), or None when it can."""
        kind = layer_kind(module)
        if quantized.is_quantized(module) and not cls.wraps_quantized:
            return (
                f"it is a bitsandbytes-quantized {type(module).__name__}, which only LoRA (and DoRA) can adapt; "
                "use adapter.method: lora, or remove model.quantization"
            )
        if kind in cls.supported_kinds:
            return None
        if kind is None:
            return (
                "it is not a layer an adapter can wrap (a container, or a layer type no method adapts); "
                "name the Linear / Conv / Embedding layers inside it instead"
            )
        return "this method has no adapter for this layer type; use LoRA for it, or leave it out"

    def merge_targets(self) -> list[Tensor]:
        """The base tensors merging writes (a safe merge that fails restores them)."""
        return [self.base_weight()]

    def base_weight(self) -> Tensor:
        """The base tensor the adapter updates: ``weight``, or an attention's ``in_proj_weight``."""
        base = self.base_layer
        return base.in_proj_weight if layer_kind(base) == MHA else base.weight

    def add(self, name: str, config: AdapterConfig, r: int, alpha: float) -> None:
        """Create adapter ``name``'s parameters (rank ``r``, ``alpha`` already per-module)."""
        raise NotImplementedError

    def get_delta_weight(self, name: str) -> Tensor:
        """Delta of adapter ``name`` in the canonical layout, deterministic (no dropout)."""
        raise NotImplementedError

    def delta_forward(self, x: Tensor, names: list[str]) -> Tensor:
        """The base output plus the deltas of adapters ``names``, applied to ``x``.

        The default folds every delta into the weight and runs the base op once:
        one full-size matmul instead of two.
        """
        weight = self.base_weight()
        delta = sum(self.to_raw(self.training_delta(n)) for n in names)
        return self.apply_weight(x, weight + delta.to(weight.dtype))

    def training_delta(self, name: str) -> Tensor:
        """Delta used in forward; methods with rank dropout override it."""
        return self.get_delta_weight(name)

    def mixed_batch_refusal(self, names: list[str]) -> str | None:
        """Why this layer cannot run a mixed batch of adapters ``names`` (with the fix), or None."""
        return (
            f"{type(self).__name__} has no per-row adapters (only LoRA layers do, as in PEFT); "
            "run one adapter at a time with set_adapter instead"
        )

    def add_update(self, result: Tensor, x: Tensor, name: str) -> Tensor:
        """``result`` plus adapter ``name``'s update of input ``x`` (for mixed batches)."""
        raise NotImplementedError

    def skip_in_forward(self, name: str) -> bool:
        """Methods with module dropout return True to skip an adapter for one step."""
        return False

    def extra_repr_for(self, name: str) -> str:
        return f"r={self.r[name]}"

    # ---------------------------------------------------------------- layouts
    @property
    def transposed(self) -> bool:
        return self.kind in (HF_CONV1D, EMBEDDING)

    def to_raw(self, delta: Tensor) -> Tensor:
        return delta.T if self.transposed else delta

    def canonical_weight(self) -> Tensor:
        if self.quant_kind is not None:  # a float32 copy of the 4-bit / int8 weight, (out, in)
            return quantized.dequantize_weight(self.base_layer)
        weight = self.base_weight()
        return weight.T if self.transposed else weight

    def adapter_dtype(self) -> torch.dtype:
        """Adapters stay in float32 on half-precision and quantized bases (stable optimiser updates)."""
        dtype = self.base_weight().dtype
        return torch.float32 if dtype in HALF_DTYPES or self.quant_kind is not None else dtype

    def new_param(self, *shape: int) -> nn.Parameter:
        weight = self.base_weight()
        return nn.Parameter(torch.empty(*shape, device=weight.device, dtype=self.adapter_dtype()))

    def apply_weight(self, x: Tensor, weight: Tensor) -> Tensor:
        """The base op with another weight (same bias, stride, padding, ...)."""
        base = self.base_layer
        if self.kind == LINEAR:
            return F.linear(x, weight, base.bias)
        if self.kind == HF_CONV1D:
            out = x.reshape(-1, x.shape[-1]) @ weight
            if base.bias is not None:
                out = out + base.bias
            return out.reshape(*x.shape[:-1], weight.shape[1])
        if self.kind in CONVS:
            return base._conv_forward(x, weight, base.bias)
        if self.kind == MHA:
            raise LoraCliError("an attention layer runs through its own forward, not apply_weight")
        return F.embedding(
            x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.batch_adapters is not None:
            return self.rows_forward(x, self.batch_adapters, *args, **kwargs)
        names = [
            n for n in self.active_adapters if n in self.r and n not in self.merged_adapters and not self.skip_in_forward(n)
        ]
        if not names:
            return self.base_layer(x, *args, **kwargs)
        return self.delta_forward(x, names)

    def rows_forward(self, x: Tensor, names: list[str], *args: Any, **kwargs: Any) -> Tensor:
        """Row ``i`` of ``x`` through the base plus adapter ``names[i]`` (none where this layer lacks
        that adapter, as for ``__base__``): a mixed batch (:mod:`lora_cli.adapters.mixed`).

        ``names`` may instead be a gate with ``layer_forward(layer, x, *args, **kwargs)``, which then
        runs the layer: X-LoRA's per-token expert weights (:mod:`lora_cli.adapters.methods.xlora.model`)."""
        gate = getattr(names, "layer_forward", None)
        if gate is not None:
            return gate(self, x, *args, **kwargs)
        if x.shape[0] != len(names):
            raise LoraCliError(
                f"adapter_names has {len(names)} name(s) but {type(self.base_layer).__name__} got a batch of "
                f"{x.shape[0]} row(s); give one adapter name per input row"
            )
        result = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(names):
            if name in self.r:
                idx = rows_of(names, name, x.device)
                rows = self.add_update(result.index_select(0, idx), x.index_select(0, idx), name)
                result = result.index_copy(0, idx, rows.to(result.dtype))
        return result

    # ------------------------------------------------------------ merge/unmerge
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas into the base weight. Merging a merged adapter is a no-op."""
        if self.quant_kind is not None and any(
            n in self.r and n not in self.merged_adapters
            for n in (adapter_names if adapter_names is not None else self.active_adapters)
        ):
            raise LoraCliError(
                f"cannot merge into the bitsandbytes-quantized {type(self.base_layer).__name__}: re-quantizing "
                "W + dW would lose most of the update and could not be undone; dequantize the model first "
                "(lora_cli.adapters.quantized.dequantize_model, as `loracli merge` does) and merge into full precision"
            )
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name not in self.r or name in self.merged_adapters:
                continue
            self.merge_one(name, safe_merge)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract merged deltas, newest first. Unmerging an unmerged layer is a no-op."""
        while self.merged_adapters:
            self.unmerge_one(self.merged_adapters.pop())

    @torch.no_grad()
    def merge_one(self, name: str, safe_merge: bool) -> None:
        weight = self.base_weight()
        delta = self.to_raw(self.get_delta_weight(name)).to(weight.dtype)
        self._write_weight(weight + delta, name, safe_merge)

    @torch.no_grad()
    def unmerge_one(self, name: str) -> None:
        weight = self.base_weight()
        weight.data -= self.to_raw(self.get_delta_weight(name)).to(weight.dtype)

    def _write_weight(self, new_weight: Tensor, name: str, safe_merge: bool) -> None:
        if safe_merge and not torch.isfinite(new_weight).all():
            raise LoraCliError(
                f"merging adapter {name!r} would put NaN/inf into {type(self.base_layer).__name__} weights; "
                "the adapter is broken (check the training loss); nothing was merged"
            )
        self.base_weight().data.copy_(new_weight)

    # ------------------------------------------------------------ bookkeeping
    def adapter_tensors(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(key suffix in the PEFT file, parameter) for adapter ``name``."""
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name in container:
                yield self.disk_names.get(attr, attr), container[name]

    def redundant_keys(self, name: str) -> list[str]:
        """Key suffixes PEFT may write for adapter ``name`` that this layer holds elsewhere (a tied
        layer's shared tensors): read past on load, never written."""
        return []

    def base_weight_loaded(self) -> None:
        """The base weight was replaced from a file (PEFT's saved embedding layers): refresh
        whatever this layer derived from it."""

    def delete(self, name: str) -> None:
        if name in self.merged_adapters:
            raise LoraCliError(f"adapter {name!r} is merged; unmerge it before deleting it")
        for attr, value in vars(self).items():
            if isinstance(value, dict) and name in value and not attr.startswith("_"):
                del value[name]
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        for module in self.children():
            if isinstance(module, nn.ModuleDict) and name in module:
                del module[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {self.extra_repr_for(n)}" for n in self.r)
