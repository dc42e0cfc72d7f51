"""LoRA on an ``nn.Parameter`` (``target_parameters``), laid out as PEFT 0.21's ParamWrapper.

transformers 5 stores the experts of an MoE block as 3-D parameters, (E, d1, d2), read by
the block's own forward (``F.linear(x, self.gate_up_proj[e])``): there is no Linear to wrap.
This layer wraps the module that owns the parameter and, while it runs, swaps in W + ΔW::

    per expert e:  ΔW[e] = s * B_e A_e          A_e = A.view(E, r, in)[e]        A: (r * E, in)
                                                B_e = B.view(out, r, E)[:, :, e]  B: (out, r * E)

For a 3-D weight (E, d1, d2): in = d2, out = d1 (F.linear's (out, in) per expert), or, when the
module says ``is_transposed`` (weights stored (E, in, out)), in = d1, out = d2 and ΔW[e] is
transposed. A 2-D weight is a plain (out, in) matrix, E = 1. ``r`` is the rank of EACH expert;
PEFT's guidance is ``rank_pattern {"experts.<param>": max(1, r // num_experts)}`` to keep the
budget of a dense layer (a warning says so when the rank does not follow it).

Several parameters of one module nest: the first parameter (in the module's order) is the
innermost wrapper, so file keys are ``P.base_layer.lora_A.weight`` for it and
``P.lora_A.weight`` for the outermost, as in PEFT. No dropout, DoRA, lora_bias or
mixed batches (PEFT has none either).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from lora_cli.adapters import functional as fn
from lora_cli.adapters.combine import CombineError
from lora_cli.adapters.config import AdapterConfig
from lora_cli.adapters.kinds import PARAMETER
from lora_cli.adapters.layers import AdapterLayer
from lora_cli.adapters.model import AdapterModel, rank_and_alpha
from lora_cli.errors import TargetingError


class ParamLoraLayer(AdapterLayer):
    """LoRA on one parameter ``parameter_name`` of the wrapped module (which may itself be one)."""

    supported_kinds = ()
    adapter_attrs = ("lora_A", "lora_B")
    disk_names = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}
    quant_kind = None
    """A parameter target is never a quantized layer."""

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        self.kind = PARAMETER
        for attr in self.adapter_attrs:
            setattr(self, attr, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.batch_adapters: list[str] | None = None
        shape = self.base_weight().shape
        owner = self.owner()
        self.is_transposed = bool(getattr(owner, "is_transposed", False))
        if len(shape) == 3:
            self.num_experts = shape[0]
            d1, d2 = shape[1], shape[2]
            self.in_features, self.out_features = (d1, d2) if self.is_transposed else (d2, d1)
        elif len(shape) == 2:
            self.num_experts, self.is_transposed = 1, False
            self.out_features, self.in_features = shape
        else:
            raise TargetingError(
                f"target_parameters: {parameter_name} of {type(owner).__name__} has {len(shape)} dimension(s); "
                "LoRA adapts 2-D (out, in) and 3-D (experts, ., .) parameters only (as PEFT); remove it"
            )

    def owner(self) -> nn.Module:
        """The module that really holds the parameter (below any nested wrappers)."""
        module = self.base_layer
        while isinstance(module, ParamLoraLayer):
            module = module.base_layer
        return module

    def base_weight(self) -> Tensor:
        return getattr(self.owner(), self.parameter_name)

    @property
    def transposed(self) -> bool:
        return False

    def new_param(self, *shape: int) -> nn.Parameter:
        weight = self.base_weight()
        return nn.Parameter(torch.empty(*shape, device=weight.device, dtype=self.adapter_dtype()))

    # ------------------------------------------------------------------ params
    def add(self, name: str, config: Any, r: int, alpha: float) -> None:
        init = config.init_lora_weights
        if init not in (True, False, "gaussian"):
            raise TargetingError(
                f"init_lora_weights={init!r} is not supported on target_parameters (parameter "
                f"{self.parameter_name}); use init_lora_weights: true, false or gaussian"
            )
        experts = self.num_experts
        self.r[name] = r
        self.scaling[name] = fn.lora_scaling(alpha, r, config.use_rslora)
        a = self.lora_A[name] = self.new_param(r * experts, self.in_features)  # (r * E, in)
        b = self.lora_B[name] = self.new_param(self.out_features, r * experts)  # (out, r * E)
        fn.random_init(a, b, init, r)

    def extra_repr_for(self, name: str) -> str:
        return f"{self.parameter_name}: r={self.r[name]} x {self.num_experts} expert(s), scaling={self.scaling[name]:g}"

    # -------------------------------------------------------------------- math
    def get_delta_weight(self, name: str) -> Tensor:
        experts, r = self.num_experts, self.r[name]
        a = self.lora_A[name].view(experts, r, self.in_features)  # (E, r, in)
        b = self.lora_B[name].view(self.out_features, r, experts).permute(2, 0, 1)  # (E, out, r)
        delta = (b @ a) * self.scaling[name]  # (E, out, in)
        if self.is_transposed:
            delta = delta.transpose(-2, -1)
        return delta[0] if self.base_weight().dim() == 2 else delta

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled and self.merged_adapters:
            self.unmerge()
        names = [] if self.disabled else [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]
        if not names:
            return self.base_layer(*args, **kwargs)
        weight = self.base_weight()
        adapted = weight + sum(self.get_delta_weight(n) for n in names).to(weight.dtype)
        depth, module = 0, self.base_layer
        while isinstance(module, ParamLoraLayer):
            depth, module = depth + 1, module.base_layer
        key = "base_layer." * depth + self.parameter_name
        return torch.func.functional_call(self.base_layer, {key: adapted}, args, kwargs, strict=False)

    def factors(self, name: str):
        """Refused: add_weighted_adapter's rank algebra assumes one (r, in) x (out, r) pair, not r per expert."""
        raise CombineError(
            f"add_weighted_adapter cannot combine LoRA on the parameter {self.parameter_name} (target_parameters: "
            "one rank block per expert); combine adapters without target_parameters, or merge each one instead"
        )

    def mixed_batch_refusal(self, names: list[str]) -> str | None:
        return "LoRA on an nn.Parameter (target_parameters) has no per-row forward (PEFT refuses it too)"


def _matched_parameters(model: nn.Module, names: list[str]) -> list[tuple[str, str]]:
    """(module path, parameter name) for every parameter whose dotted name equals or ends with
    ``"." + name`` for a name in ``names``; in model order, each module's parameters in its own order."""
    out = []
    for raw_path, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            continue
        path = ".".join(p for p in raw_path.split(".") if p != "base_layer")  # below existing wrappers
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{path}.{param_name}" if path else param_name
            if any(key == n or key.endswith("." + n) for n in names):
                out.append((path, param_name))
    return out


def _check_rank_guidance(found: dict[str, tuple[int, int, int]]) -> None:
    """PEFT's documented rule for expert parameters: per-expert rank max(1, r // num_experts)."""
    for leaf, (rank, r, experts) in found.items():
        wanted = max(1, r // experts)
        if experts > 1 and rank > wanted:
            warnings.warn(
                f"target_parameters: {leaf} holds {experts} experts and gets rank {rank} per expert, so its lora_A "
                f"has {rank * experts} rows ({experts}x a dense layer's budget). PEFT's guidance: a per-expert rank "
                f"of max(1, r // num_experts) = {wanted}; set rank_pattern: {{\"{leaf}\": {wanted}}} "
                "(or ignore this if you want the larger budget)",
                UserWarning,
                stacklevel=6,  # the caller of get_adapter_model
            )


def inject_parameter_targets(model: AdapterModel, adapter_name: str, config: AdapterConfig, aliases: dict) -> list[str]:
    """LoRA's ``target_parameters``: one :class:`ParamLoraLayer` per matched parameter."""
    names = getattr(config, "target_parameters", None)
    if not names:
        return []
    for other, other_config in model.peft_config.items():
        theirs = getattr(other_config, "target_parameters", None)
        if theirs and set(theirs) != set(names):
            raise TargetingError(
                f"target_parameters {sorted(names)} differ from adapter {other!r}'s {sorted(theirs)}; adapters on one "
                "model that use target_parameters must all target the same parameters (as in PEFT)"
            )
    base = model.base_model
    matched = _matched_parameters(base, list(names))
    if not matched:
        params = sorted({n.rsplit(".", 1)[-1] for n, p in base.named_parameters() if p.dim() in (2, 3)})
        raise TargetingError(
            f"target_parameters {list(names)} matched no parameter of the model; give parameter names "
            f"(dotted suffixes) such as 'mlp.experts.gate_up_proj'. 2-D/3-D parameter names here: "
            f"{', '.join(params[:20])}"
        )
    found: dict[str, tuple[int, int, int]] = {}
    for path, param_name in matched:
        if path == "":
            raise TargetingError(f"target_parameters: {param_name} sits on the top-level model, which cannot be "
                                 "wrapped (PEFT refuses it too); target a parameter of a submodule")
        module = base.get_submodule(path)
        layer = module
        while isinstance(layer, ParamLoraLayer) and layer.parameter_name != param_name:
            layer = layer.base_layer
        if not isinstance(layer, ParamLoraLayer):
            if isinstance(module, AdapterLayer) and not isinstance(module, ParamLoraLayer):
                raise TargetingError(
                    f"target_parameters: {path}.{param_name} belongs to {path}, which target_modules also adapts; "
                    f"a module gets LoRA either on the module or on its parameters. Remove {path} from target_modules "
                    "(target_modules: [] targets nothing)"
                )
            layer = ParamLoraLayer(module, param_name)
            base.set_submodule(path, layer)
        key = f"{path}.{param_name}"
        r, alpha = rank_and_alpha(config, key, None)
        layer.add(adapter_name, config, r, alpha)
        layer.active_adapters = [n for n in model.active_adapters if n in layer.r]
        leaf = ".".join(key.split(".")[-2:])
        found.setdefault(leaf, (r, config.r, layer.num_experts))
    # wrapping a module again moves its inner wrappers down one base_layer: report where they are now
    created = [p for p, m in model.adapter_layers() if isinstance(m, ParamLoraLayer) and adapter_name in m.r]
    _check_rank_guidance(found)
    return created

