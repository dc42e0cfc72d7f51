"""LoRA: low-rank adaptation (Hu et al., arXiv:2106.09685), with rsLoRA and DoRA.

    y = W x + s * B (A (dropout(x)))        A: (r, in), B: (out, r), s = alpha / r

rsLoRA (arXiv:2312.03732) uses s = alpha / sqrt(r). DoRA (``use_dora``) is a variant
object the layer calls to create, merge, unmerge and run such an adapter: see
:mod:`lora_cli.adapters.methods.dora`.

On convolutions (``nn.Conv1d``, ``nn.Conv2d``) A is a conv with the base kernel/stride/
padding and B a 1x1 conv; on embeddings A is a lookup table (r, num_embeddings) and B
(dim, r).

On a grouped convolution (groups = G > 1) A still sees every input channel and B is a
grouped 1x1 conv, (out, r / G, 1, 1): PEFT's layout. The dense update that makes cannot
live in the grouped kernel, so such an adapter is never merged (DoRA included).

``lora_bias``: lora_B gets a bias b (out,), y = W x + s (B A x + b); merging adds s b to
the base bias (a base without a bias cannot merge it). ``nn.MultiheadAttention`` has its
own layer: :mod:`lora_cli.adapters.methods.lora_mha`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lora_cli.adapters import functional as fn
from lora_cli.adapters.base_rewrites import rewrites_base
from lora_cli.adapters.config import (
    MAX_RANK,
    AdapterConfig,
    check_choice,
    check_number,
    check_patterns,
    check_positive_int,
    check_rate,
)
from lora_cli.adapters.corda import corda_config_problems
from lora_cli.adapters.eva import eva_config_problems
from lora_cli.adapters.layers import (
    CONV2D,
    CONV3D,
    CONVS,
    EMBEDDING,
    HF_CONV1D,
    LINEAR,
    TORCH_CONV1D,
    AdapterLayer,
    layer_kind,
)
from lora_cli.adapters.loftq import loftq_config_problems, loftq_factors
from lora_cli.adapters.lora_ga import lora_ga_config_problems
from lora_cli.adapters.methods.dora import DoraVariant, LoraVariant
from lora_cli.adapters.mica import FrozenParameter
from lora_cli.adapters.registry import register_method
from lora_cli.errors import LoraCliError, Problem, TargetingError, UserInputError

INIT_CHOICES = (
    True,
    False,
    "gaussian",
    "pissa",
    "pissa_niter_[N]",
    "olora",
    "orthogonal",
    "eva",
    "corda",
    "mica",
    "loftq",
    "lora_ga",
)
BIAS_CHOICES = ("none", "all", "lora_only")
@dataclass
class LoraConfig(AdapterConfig):
    """LoRA settings, with PEFT's field names and defaults."""

    peft_type: ClassVar[str] = "LORA"
    on_quantized_base: ClassVar[bool] = True
    method: ClassVar[str] = "lora"

    r: int = 8
    """Rank of the update; higher captures more, costs more memory and compute."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / r (or / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input, in [0, 1)."""
    fan_in_fan_out: bool = False
    """The base stores weights as (in, out); set automatically for GPT-2's Conv1D."""
    bias: str = "none"
    """Which biases train too: "none", "all", or "lora_only" (those of adapted layers)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r); keeps large ranks learning."""
    init_lora_weights: bool | str = True
    """True (B=0), False (random, non-zero delta), "gaussian", "pissa", "pissa_niter_N", "olora", "orthogonal"."""
    use_dora: bool = False
    """Weight-decomposed LoRA: learn a magnitude per output row."""
    lora_bias: bool = False
    """A trainable bias on lora_B, merged into the base bias (not with DoRA or SVD-based inits)."""
    # -- options of trainable tokens and parameter targets go below this line --
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    """Token ids whose embedding rows train (the rest of the matrix stays frozen): a list for
    the input embedding, or {embedding module name: ids}. Modules tied to the embedding follow
    them (a tied output layer; T5's and BART's encoder and decoder embed_tokens)."""
    target_parameters: list[str] | None = None
    """nn.Parameter names (exact or dotted suffix, e.g. "mlp.experts.gate_up_proj") to adapt
    directly: how transformers 5 MoE experts, stored as 3-D (experts, ., .) tensors, get LoRA.
    On a 3-D parameter ``r`` is the rank of EACH expert (lora_A holds r * experts rows); PEFT's
    guidance is rank_pattern {"experts.gate_up_proj": max(1, r // num_experts)} to keep the
    budget of a dense layer. No dropout, DoRA, lora_bias or fan_in_fan_out there."""

    # -- options of the data-driven and quantization-aware inits go below this line --
    loftq_config: dict = field(default_factory=dict)
    """LoftQ settings (init_lora_weights: loftq): {loftq_bits: 2 | 4 | 8, loftq_iter: N}."""
    lora_ga_config: dict | None = None
    """LoRA-GA settings (init_lora_weights: lora_ga): direction ArB2r | A2rBr | ArBr | random,
    scale stable | weight_svd | gd_scale | unit, stable_gamma (16)."""
    eva_config: dict | None = None
    """EVA settings (init_lora_weights: eva): rho, tau, use_label_mask, label_mask_value, whiten, adjust_scaling_factors."""
    corda_config: dict | None = None
    """CorDA settings (init_lora_weights: corda): corda_method ipm|kpm, cache_file, covariance_file, ..."""

    def problems(self) -> list[Problem]:
        out = super().problems()
        out += check_positive_int("r", self.r, maximum=MAX_RANK)
        out += check_number("lora_alpha", self.lora_alpha)
        out += check_rate("lora_dropout", self.lora_dropout)
        out += check_choice("bias", self.bias, BIAS_CHOICES)
        out += check_patterns(self)
        out += _token_and_parameter_problems(self)
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in INIT_CHOICES or fn.parse_pissa_niter(init) is not None):
            shown = ", ".join(repr(c) for c in INIT_CHOICES)
            out.append(Problem("init_lora_weights", f"must be one of {shown}", init))
        elif init == "orthogonal" and isinstance(self.r, int) and self.r % 2:
            out.append(Problem("init_lora_weights", "'orthogonal' needs an even r", init, hint=f"r is {self.r}"))
        out += eva_config_problems(init, self.eva_config) + corda_config_problems(init, self.corda_config)
        out += loftq_config_problems(init, self.loftq_config) + lora_ga_config_problems(init, self.lora_ga_config)
        if init == "mica" and self.use_dora is True:  # its B is frozen; DoRA is another variant
            out.append(Problem("use_dora", "cannot be combined with init_lora_weights: mica", True,
                               hint="set use_dora: false, or use another init"))
        if not isinstance(self.lora_bias, bool):
            out.append(Problem("lora_bias", "must be true or false", self.lora_bias))
        elif self.lora_bias and (self.use_dora or not isinstance(init, bool)):  # PEFT 0.21 refuses both
            other = "cannot be combined with use_dora" if self.use_dora else f"needs init_lora_weights true or false, not {init!r}"
            out.append(Problem("lora_bias", other, True, hint="set lora_bias: false, or change the other option"))
        return out


def _token_and_parameter_problems(config: LoraConfig) -> list[Problem]:
    """trainable_token_indices and target_parameters: shapes of the values, and the options
    PEFT 0.21 refuses beside them (its ParamWrapper has no dropout, DoRA, lora_bias or
    fan_in_fan_out). AdaLoRA takes trainable tokens, as PEFT's does, but not
    target_parameters (PEFT 0.21's AdaLoRA fails on it with a TypeError)."""
    out: list[Problem] = []
    tokens, params = config.trainable_token_indices, config.target_parameters
    if config.peft_type != "LORA":
        if params:
            out.append(Problem("target_parameters", f"is not supported by {config.method} (only plain LoRA has it)",
                               params, hint="remove target_parameters, or use method: lora"))
            return out
        if config.peft_type != "ADALORA" and tokens:
            out.append(Problem("trainable_token_indices", f"is not supported by {config.method}", tokens,
                               hint="remove trainable_token_indices, or use method: lora or adalora"))
            return out

    def bad_ids(ids: object) -> bool:
        return not (isinstance(ids, list) and ids
                    and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids))

    if tokens is not None:
        if isinstance(tokens, dict):
            for name, ids in tokens.items():
                if not isinstance(name, str) or not name:
                    out.append(Problem("trainable_token_indices", "keys must be embedding module names", name))
                elif bad_ids(ids):
                    out.append(Problem(f"trainable_token_indices[{name!r}]", "must be a non-empty list of token ids >= 0",
                                       ids, hint="e.g. [32000, 32001]"))
            if not tokens:
                out.append(Problem("trainable_token_indices", "is an empty mapping", tokens,
                                   hint="give {embedding module: [token ids]}, or remove the key"))
        elif bad_ids(tokens):
            out.append(Problem("trainable_token_indices",
                               "must be a non-empty list of token ids >= 0, or {embedding module: [ids]}", tokens,
                               hint="e.g. [32000, 32001] for the input embedding"))
        elif isinstance(tokens, list) and len(set(tokens)) != len(tokens):
            out.append(Problem("trainable_token_indices", "lists a token id twice", tokens, hint="list each id once"))
    if params is not None:
        if isinstance(params, str) or not (isinstance(params, list) and all(isinstance(p, str) and p for p in params)):
            out.append(Problem("target_parameters", "must be a list of parameter names (regexes are not supported, "
                               "as in PEFT)", params, hint='e.g. ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]'))
        elif params:
            clashes = (("lora_dropout", bool(config.lora_dropout)), ("use_dora", config.use_dora is True),
                       ("lora_bias", config.lora_bias is True), ("fan_in_fan_out", config.fan_in_fan_out is True))
            for key, on in clashes:
                if on:
                    out.append(Problem(key, "cannot be combined with target_parameters (LoRA on an nn.Parameter "
                                       "folds the update into the tensor; PEFT refuses it too)", getattr(config, key),
                                       hint=f"remove {key}, or move these parameters to a separate adapter"))
    return out


class LoraLayer(AdapterLayer):
    supported_kinds = (LINEAR, HF_CONV1D, TORCH_CONV1D, CONV2D, CONV3D, EMBEDDING)
    wraps_quantized = True  # bitsandbytes Linear4bit / Linear8bitLt: base run as is, A and B in float32
    adapter_attrs = (
        "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_B_bias"
    )
    disk_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_B_bias": "lora_B.bias"}
    kind_layers: ClassVar[dict[str, type[LoraLayer]]] = {}
    """Layer classes for kinds that need their own (``MHA``), filled by their modules."""

    @classmethod
    def refusal(cls, module: nn.Module) -> str | None:
        special = cls.kind_layers.get(layer_kind(module))
        if special is not None and special is not cls:
            return special.refusal(module)
        return super().refusal(module)

    @classmethod
    def wrap(cls, module: nn.Module) -> AdapterLayer:
        return cls.kind_layers.get(layer_kind(module), cls)(module)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.lora_variant: dict[str, LoraVariant] = {}  # adapters with a variant (DoRA) only
        self.base_rewrites: dict[str, dict[str, Tensor]] = {}
        """Per adapter, how its init rewrote the base weight (``record_base_rewrite``)."""

    def extra_repr_for(self, name: str) -> str:
        dora = ", dora" if isinstance(self.lora_variant.get(name), DoraVariant) else ""
        return f"r={self.r[name]}, scaling={self.scaling[name]:g}{dora}"

    @property
    def groups(self) -> int:
        """Groups of a convolution base layer; 1 for every other kind."""
        return self.base_layer.groups if self.kind in CONVS else 1

    # ------------------------------------------------------------------ params
    def add(self, name: str, config: LoraConfig, r: int, alpha: float) -> None:
        init = config.init_lora_weights
        if self.quant_kind is not None and rewrites_base(init):  # writing a 4-bit / 8-bit weight is impossible
            raise TargetingError(
                f"init_lora_weights={init!r} rewrites the base weight, which is bitsandbytes-quantized here "
                f"({type(self.base_layer).__name__}); use init_lora_weights: true, gaussian or orthogonal with "
                "model.quantization, or remove model.quantization (loftq quantizes a full-precision base itself)"
            )
        if config.lora_bias and self.kind == EMBEDDING:
            raise TargetingError(
                f"lora_bias is not supported on the embedding {self.base_layer} (PEFT refuses it too); "
                "set lora_bias: false or exclude this module (exclude_modules)"
            )
        if self.groups > 1:
            where = f"{self.base_layer} (groups={self.groups})"
            if r % self.groups:
                raise TargetingError(
                    f"LoRA on the grouped convolution {where} needs r divisible by groups, got r={r}; "
                    f"use a multiple of {self.groups} (rank_pattern can set it for this module alone) "
                    "or exclude this module"
                )
        self.r[name] = r
        self.scaling[name] = fn.lora_scaling(alpha, r, config.use_rslora)
        p = config.lora_dropout
        self.lora_dropout[name] = nn.Dropout(p) if p > 0 and self.kind != EMBEDDING else nn.Identity()
        if self.kind == EMBEDDING:
            self.lora_embedding_A[name] = self.new_param(r, self.in_features)
            self.lora_embedding_B[name] = self.new_param(self.out_features, r)
        elif self.kind in CONVS:
            base = self.base_layer
            kernel = base.kernel_size
            if any(d != 1 for d in base.dilation) or base.padding_mode != "zeros":
                warnings.warn(
                    f"LoRA on {base}: A runs with this conv's dilation and padding mode, so merging is "
                    "exact, but PEFT runs A undilated with zero padding: the same adapter file gives "
                    "different outputs in PEFT",
                    stacklevel=2,
                )
            self.lora_A[name] = self.new_param(r, self.in_features, *kernel)  # (r, in, *kernel)
            self.lora_B[name] = self.new_param(self.out_features, r // self.groups, *[1] * len(kernel))
        else:
            self.lora_A[name] = self.new_param(r, self.in_features)
            self.lora_B[name] = self.new_param(self.out_features, r)
        if config.lora_bias:
            self.lora_B_bias[name] = self.new_param(self.out_features)
        self._init(name, config.init_lora_weights, config)
        if config.use_dora:
            self.lora_variant[name] = DoraVariant()
            self.lora_variant[name].init(self, name)

    @torch.no_grad()
    def _init(self, name: str, init: bool | str, config: LoraConfig | None = None) -> None:
        if init in ("mica", "loftq"):
            return self._init_from_weight(name, init, config)
        if init == "lora_ga" and self.kind not in (LINEAR, HF_CONV1D):  # PEFT's estimate skips them too
            raise TargetingError(
                f"init_lora_weights='lora_ga' supports Linear and GPT-2 Conv1D layers only, not "
                f"{type(self.base_layer).__name__}; use init_lora_weights: true or exclude this module"
            )
        if self.kind == EMBEDDING:
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            nn.init.normal_(a) if init is False else nn.init.zeros_(a)
            nn.init.normal_(b)
            return
        a, b = self.lora_A[name], self.lora_B[name]
        r, s = self.r[name], self.scaling[name]
        niter = fn.parse_pissa_niter(init)
        if init in ("pissa", "olora") or niter is not None:
            weight = self.canonical_weight()
            if weight.dim() != 2:
                raise TargetingError(
                    f"init_lora_weights={init!r} supports Linear and GPT-2 Conv1D layers only, "
                    f"not {type(self.base_layer).__name__}; use init_lora_weights: true or exclude this module"
                )
            if init == "olora":
                fa, fb = fn.olora_factors(weight, r)
            else:
                fa, fb = fn.pissa_factors(weight, r, s, niter)
            a.copy_(fa)
            b.copy_(fb)
            self.base_weight().data.copy_(self.to_raw(fn.low_rank_residual(weight, fa, fb, s)))
            self.record_base_rewrite(name, fa, fb)
        elif init in ("eva", "corda"):  # a zero delta until the calibration pass sets A (and B, W)
            if init == "corda" and a.dim() != 2:
                raise TargetingError(
                    f"init_lora_weights='corda' supports Linear and GPT-2 Conv1D layers only, not "
                    f"{type(self.base_layer).__name__}; use init_lora_weights: true or exclude this module"
                )
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
        elif init == "orthogonal":
            if a.dim() != 2:  # PEFT refuses it on convolutions too
                raise TargetingError(
                    f"init_lora_weights='orthogonal' supports Linear and GPT-2 Conv1D layers only, not "
                    f"{type(self.base_layer).__name__}; use init_lora_weights: true or exclude this module"
                )
            fa, fb = fn.orthogonal_factors(self.in_features, self.out_features, r)
            a.copy_(fa)
            b.copy_(fb)
        else:
            fn.random_init(a, b, init, r)
        if name in self.lora_B_bias:  # as nn.Linear draws a bias for B's fan-in; zero for a zero delta
            bound = 1 / math.sqrt(b[0].numel()) if init is False else 0.0
            nn.init.uniform_(self.lora_B_bias[name], -bound, bound)

    @torch.no_grad()
    def _init_from_weight(self, name: str, init: str, config: LoraConfig | None) -> None:
        """MiCA (B = minor left singular vectors of W, frozen; A = 0) and LoftQ (W <- its
        dequantized values, A and B the low-rank fit of the quantization error)."""
        weight = self.canonical_weight()
        kinds = (LINEAR, HF_CONV1D, EMBEDDING) if init == "mica" else (LINEAR, HF_CONV1D)
        if self.kind not in kinds:
            shown = "Linear, GPT-2 Conv1D and Embedding" if init == "mica" else "Linear and GPT-2 Conv1D"
            raise TargetingError(
                f"init_lora_weights={init!r} supports {shown} layers only, not "
                f"{type(self.base_layer).__name__}; use init_lora_weights: true or exclude this module"
            )
        a, b = self.factors(name)
        r = self.r[name]
        if init == "mica":
            if r > min(weight.shape):
                raise TargetingError(
                    f"init_lora_weights='mica' needs r <= {min(weight.shape)} here (weight {tuple(weight.shape)}), "
                    f"got r={r}; lower r (rank_pattern can set it for this module alone) or exclude this module"
                )
            fa, fb = fn.mica_factors(weight, r)
            a.copy_(fa)
            b.copy_(fb)
            container = self.lora_embedding_B if self.kind == EMBEDDING else self.lora_B
            container[name] = FrozenParameter(b.data)
            return
        settings = {"loftq_bits": 4, "loftq_iter": 1, **((config.loftq_config if config else None) or {})}
        q, fa, fb = loftq_factors(weight, settings["loftq_bits"], r, settings["loftq_iter"])
        a.copy_(fa)
        b.copy_(fb)
        self.base_weight().data.copy_(self.to_raw(q))
        self.record_base_weight(name, self.base_weight())

    # ------------------------------------------------ base weights an init rewrote
    def record_base_rewrite(self, name: str, lora_a: Tensor, lora_b: Tensor) -> None:
        """Note that adapter ``name``'s init set this layer's base weight to
        ``fn.low_rank_residual(W, lora_a, lora_b, s)`` = W - s B0 A0 (PiSSA, OLoRA, CorDA,
        LoRA-GA). Call it right after rewriting, with the A0 (r, in) and B0 (out, r) used.

        With the record, the trained adapter can be saved relative to the original W
        (rank 2r: [A; A0], [B, -B0]) and a resumed run can rebuild W - s B0 A0 bit for bit
        without the init: see :mod:`lora_cli.adapters.base_rewrites`."""
        self.base_rewrites[name] = {"lora_A": lora_a.detach().to("cpu", copy=True),
                                    "lora_B": lora_b.detach().to("cpu", copy=True)}

    def record_base_weight(self, name: str, weight: Tensor) -> None:
        """Note that adapter ``name``'s init replaced this layer's base weight by ``weight``
        (as stored, e.g. (in, out) for GPT-2's Conv1D), a change that is not low rank (LoftQ's
        dequantized weights): saving then writes the weight itself beside the adapter."""
        self.base_rewrites[name] = {"weight": weight.detach().to("cpu", copy=True)}

    # -------------------------------------------------------------------- math
    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """A and B of adapter ``name``: ``lora_embedding_A`` / ``_B`` on an embedding."""
        if self.kind == EMBEDDING:
            return self.lora_embedding_A[name], self.lora_embedding_B[name]
        return self.lora_A[name], self.lora_B[name]

    def get_delta_weight(self, name: str) -> Tensor:
        if self.groups > 1:
            raise UserInputError(
                f"a LoRA adapter on the grouped convolution {self.base_layer} cannot be merged: its A mixes "
                "all input channels, which a grouped kernel cannot hold (PEFT cannot merge it either); "
                "use the adapter unmerged, or train it without this module (exclude_modules)"
            )
        return fn.lora_delta(*self.factors(name), self.scaling[name])

    def dora_delta(self, name: str, a: Tensor, b: Tensor) -> Tensor:
        """The s B A that DoRA's norm ||W + s B A|| uses: the delta, or on a grouped conv,
        where no dense delta fits the kernel, PEFT 0.21's reading of B and A (see
        ``fn.grouped_lora_weight``), so that DoRA files mean the same in both tools."""
        if self.groups > 1:
            return fn.grouped_lora_weight(a, b, self.base_weight().shape) * self.scaling[name]
        return fn.lora_delta(a, b, self.scaling[name])

    def bias_update(self, name: str, like: Tensor) -> Tensor | None:
        """s b, shaped to add to an output like ``like`` (channel dim 1 on convs), or None."""
        if name not in self.lora_B_bias:
            return None
        bias = self.lora_B_bias[name] * self.scaling[name]
        return bias.view(-1, *[1] * (like.dim() - 2)) if self.kind in CONVS else bias

    def delta_forward(self, x: Tensor, names: list[str]) -> Tensor:
        result = self.base_layer(x)
        for name in names:
            variant = self.lora_variant.get(name)
            result = self.add_update(result, x, name) if variant is None else variant.forward(self, name, x, result)
        return result

    def mixed_batch_refusal(self, names: list[str]) -> str | None:
        dora = [n for n in names if n in self.lora_variant]
        return f"DoRA adapters {dora} have no per-row forward (PEFT refuses them too)" if dora else None

    def add_update(self, result: Tensor, x: Tensor, name: str) -> Tensor:
        """``result`` + s B A x (+ s b) of plain LoRA adapter ``name``."""
        if self.kind == EMBEDDING:
            return result + self.embedding_update(x, name).to(result.dtype)
        a, b = self.lora_A[name], self.lora_B[name]
        xd, s = fn.dropout_rescale_folded(x.to(a.dtype), self.lora_dropout[name], self.scaling[name])
        if self.kind in CONVS:
            result = result + self.low_rank(xd, a, b * s).to(result.dtype)
        else:
            # (..., in) @ A.T -> (..., r) @ (s B).T -> (..., out): scaling folded into tiny B
            result = fn.add_low_rank(result, F.linear(xd, a), b * s)
        bias = self.bias_update(name, result)
        return result if bias is None else result + bias.to(result.dtype)

    def low_rank(self, xd: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """B(A(xd)) for Linear/Conv1D and for convolutions (A: the base's kernel, stride,
        padding and dilation over all input channels; B: 1x1, grouped like the base)."""
        if self.kind not in CONVS:
            return F.linear(F.linear(xd, a), b)
        base = self.base_layer
        padding = base.padding
        if base.padding_mode != "zeros":
            xd = F.pad(xd, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = 0
        h = fn.conv(xd, a, stride=base.stride, padding=padding, dilation=base.dilation)
        return fn.conv(h, b, groups=base.groups)

    def embedding_update(self, x: Tensor, name: str) -> Tensor:
        """s B A[x] for token ids ``x``: (..., dim), in the adapter's dtype."""
        a, b = self.factors(name)
        base = self.base_layer
        h = F.embedding(x, a.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return h @ (b * self.scaling[name]).T

    # ---------------------------------------------------- merging with a variant
    def unmerged_weight(self, merged: list[str] | None = None) -> Tensor:
        """The canonical base weight without the adapters ``merged`` (default: those merged
        now), which DoRA's norm and DoRA's ``W x`` need. With nothing merged it is the weight
        itself; else float32, solved from the merged weight ``alpha * W + offset`` (each
        merged adapter says how it changed alpha and offset), so no copy of W is kept."""
        weight = self.canonical_weight()
        merged = self.merged_adapters if merged is None else merged
        if not merged:
            return weight
        weight = weight.float()
        alpha = torch.ones(weight.shape[0], *[1] * (weight.dim() - 1), device=weight.device)
        offset = torch.zeros_like(weight)
        for name in merged:
            delta = self.get_delta_weight(name).float()
            variant = self.lora_variant.get(name)
            if variant is None:
                offset = offset + delta
            else:
                alpha, offset = variant.merged_form(self, name, alpha, offset, delta)
        return (weight - offset) / alpha

    def merge_targets(self) -> list[Tensor]:
        bias = getattr(self.base_layer, "bias", None)
        return super().merge_targets() + ([bias] if len(self.lora_B_bias) and bias is not None else [])

    @torch.no_grad()
    def merge_one(self, name: str, safe_merge: bool) -> None:
        variant = self.lora_variant.get(name)
        if name in self.lora_B_bias:
            self._merge_bias(name, safe_merge, sign=1)
        if variant is None:
            return super().merge_one(name, safe_merge)
        weight = self.canonical_weight()
        new = variant.merge_safe(self, name, weight)
        self._write_weight(self.to_raw(new).to(weight.dtype), name, safe_merge)

    @torch.no_grad()
    def _merge_bias(self, name: str, safe_merge: bool, sign: int) -> None:
        """Add (sign 1) or subtract s b from the base bias; checked before the weight moves."""
        bias = self.base_layer.bias
        if bias is None:
            raise LoraCliError(
                f"adapter {name!r} has a lora_bias, but {self.base_layer} has no bias to merge it into; "
                "use the adapter unmerged (PEFT cannot merge it either), or train it with lora_bias: false"
            )
        self.get_delta_weight(name)  # refuses grouped convs before anything is written
        new = bias + sign * (self.lora_B_bias[name] * self.scaling[name]).to(bias.dtype)
        if safe_merge and not torch.isfinite(new).all():
            raise LoraCliError(f"merging adapter {name!r} would put NaN/inf into the bias; nothing was merged")
        bias.copy_(new)

    @torch.no_grad()
    def unmerge_one(self, name: str) -> None:
        variant = self.lora_variant.get(name)
        if name in self.lora_B_bias:
            self._merge_bias(name, False, sign=-1)
        if variant is None:
            return super().unmerge_one(name)
        weight = self.canonical_weight()
        old = variant.unmerge(self, name, weight)
        self.base_weight().data.copy_(self.to_raw(old).to(weight.dtype))


register_method(LoraConfig, LoraLayer, prefix="lora_")
