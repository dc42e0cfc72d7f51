"""AdaLoRA: adaptive budget allocation for low-rank adaptation (Zhang et al., arXiv:2303.10512).

    y = W x + B (A * E) x * alpha / (ranknum + 1e-5)      A: (r, in), E: (r, 1), B: (out, r)

The update is kept in SVD form, P diag(E) Q, so a rank is removed by zeroing one
"singular value" E_i. Every module starts at rank ``init_r`` (ranknum stays ``init_r``,
also after pruning). During training the allocator scores every rank triplet

    I = |p * grad p|,  Ibar <- b1 Ibar + (1 - b1) I,  U <- b2 U + (1 - b2) |I - Ibar|
    score_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki),   s = Ibar * U

and zeroes the lowest-scored E entries until the total rank meets a budget that falls
cubically from ``init_r * n`` to ``target_r * n`` between steps ``tinit`` and
``total_step - tfinal``; the final mask is then frozen. A penalty
``orth_reg_weight * mean ||P P^T - I||_F`` over all A (rows) and B (columns) keeps P and Q
near-orthogonal. Saved adapters hold the kept ranks only, plus the mask as ``rank_pattern``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from lora_cli.adapters import functional as fn
from lora_cli.adapters.config import check_positive_int
from lora_cli.adapters.layers import HF_CONV1D, LINEAR, AdapterLayer
from lora_cli.adapters.methods.lora import LoraConfig
from lora_cli.adapters.registry import MethodState, register_method
from lora_cli.adapters.state import KEY_PREFIX, remap_legacy_key
from lora_cli.adapters.targeting import module_aliases
from lora_cli.errors import AdapterStateError, LoraCliError, Problem

MASK_SUFFIX = ".lora_E"


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA settings: LoRA's fields (``r`` unused, as in PEFT) plus the rank schedule."""

    peft_type: ClassVar[str] = "ADALORA"
    method: ClassVar[str] = "adalora"

    target_r: int = 8
    """Average rank per module left after pruning."""
    init_r: int = 12
    """Rank every module starts with."""
    tinit: int = 0
    """Warm-up steps before any pruning."""
    tfinal: int = 0
    """Final steps that train the frozen, pruned ranks."""
    deltaT: int = 1
    """Prune every deltaT steps during the budgeting phase."""
    beta1: float = 0.85
    """EMA factor of the sensitivity."""
    beta2: float = 0.85
    """EMA factor of the uncertainty."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality penalty added to the training loss."""
    total_step: int | None = None
    """Total optimizer steps of the run (required): the budget schedule spans it."""
    rank_pattern: dict[str, list[bool]] | None = None
    """Kept ranks per module, {"<module path>.lora_E": [bool] * init_r}; written on save."""

    def __post_init__(self) -> None:
        keep_none = self.rank_pattern is None
        if self.r != 8:
            warnings.warn("AdaLoRA ignores r; set init_r (start rank) and target_r (final average rank)", stacklevel=3)
        super().__post_init__()
        if keep_none:
            self.rank_pattern = None

    def problems(self) -> list[Problem]:
        out = [
            p for p in super().problems() if p.key != "init_lora_weights" and not p.key.startswith("rank_pattern[")
        ]
        out += check_positive_int("init_r", self.init_r)
        out += check_positive_int("deltaT", self.deltaT)
        for name in ("target_r", "tinit", "tfinal"):
            out += check_positive_int(name, getattr(self, name), allow_zero=True)
        total = self.total_step
        if total is None:
            out.append(Problem("total_step", "is required: the rank budget schedule spans the whole run", None,
                               hint="set it to the number of optimizer steps (epochs * steps per epoch)"))
        elif isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            out.append(Problem("total_step", "must be an integer > 0", total))
        elif all(type(getattr(self, n)) is int for n in ("tinit", "tfinal")) and self.tinit >= total - self.tfinal:
            out.append(Problem(
                "tinit",
                f"no budgeting phase: tinit ({self.tinit}) >= total_step ({total}) - tfinal ({self.tfinal}), "
                "so ranks would never be pruned",
                self.tinit,
                hint="lower tinit or tfinal, or raise total_step, so that tinit < total_step - tfinal",
            ))
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                out.append(Problem(name, "must be a number in (0, 1)", value, hint="e.g. 0.85"))
        weight = self.orth_reg_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            out.append(Problem("orth_reg_weight", "must be a number >= 0", weight, hint="0 disables the penalty"))
        if not isinstance(self.init_lora_weights, bool):
            out.append(Problem("init_lora_weights", "must be true or false for AdaLoRA", self.init_lora_weights))
        if self.use_dora:
            out.append(Problem("use_dora", "is not supported by AdaLoRA", True, hint="set use_dora: false"))
        if self.use_rslora:
            out.append(Problem("use_rslora", "has no meaning in AdaLoRA", True, hint="set use_rslora: false"))
        if self.alpha_pattern:
            out.append(Problem("alpha_pattern", "is not supported by AdaLoRA", self.alpha_pattern,
                               hint="remove it; lora_alpha applies to every module"))
        for key, mask in (self.rank_pattern or {}).items():
            if not (isinstance(mask, list) and all(isinstance(b, bool) for b in mask)):
                out.append(Problem(f"rank_pattern[{key!r}]", "must be a list of booleans (the kept ranks)", mask))
        return out


class AdaLoraLayer(AdapterLayer):
    supported_kinds = (LINEAR, HF_CONV1D)
    adapter_attrs = ("lora_A", "lora_B", "lora_E")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_dropout = nn.ModuleDict()
        self.ranknum = nn.ParameterDict()  # frozen (1,) per adapter; a tensor so forward matches PEFT bit for bit
        self.scaling: dict[str, float] = {}

    def extra_repr_for(self, name: str) -> str:
        return f"r={self.r[name]}, scaling={self.scaling[name]:g}"

    def add(self, name: str, config: AdaLoraConfig, r: int, alpha: float) -> None:
        r, alpha = config.init_r, config.lora_alpha  # PEFT ignores r, rank_pattern and alpha_pattern here
        self.r[name] = r
        self.scaling[name] = alpha if alpha > 0 else float(r)
        p = config.lora_dropout
        self.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.lora_A[name] = self.new_param(r, self.in_features)
        self.lora_E[name] = self.new_param(r, 1)
        self.lora_B[name] = self.new_param(self.out_features, r)
        ranknum = self.new_param(1).requires_grad_(False)
        self.ranknum[name] = ranknum
        with torch.no_grad():
            ranknum.fill_(float(r))
            for attr in self.adapter_attrs:
                param = getattr(self, attr)[name]
                if config.init_lora_weights is False:
                    nn.init.normal_(param)
                elif attr == "lora_E":
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, mean=0.0, std=0.02)

    @torch.no_grad()
    def resize(self, name: str, keep: list[bool]) -> None:
        """Keep only the ranks where ``keep`` is True (ranknum, the scale, is unchanged)."""
        k = sum(keep)
        if self.r[name] == k:
            return
        if self.r[name] != len(keep):
            raise AdapterStateError(f"rank_pattern has {len(keep)} entries for a module of rank {self.r[name]}")
        idx = torch.tensor(keep, dtype=torch.bool, device=self.lora_E[name].device)
        for attr, shape, dim in (("lora_A", (k, self.in_features), 0), ("lora_E", (k, 1), 0),
                                 ("lora_B", (self.out_features, k), 1)):
            old = getattr(self, attr)[name]
            new = self.new_param(*shape).requires_grad_(old.requires_grad)
            new.copy_(old[idx] if dim == 0 else old[:, idx])
            getattr(self, attr)[name] = new
        self.r[name] = k

    def delete(self, name: str) -> None:
        super().delete(name)
        if name in self.ranknum:
            del self.ranknum[name]

    def get_delta_weight(self, name: str) -> Tensor:
        return fn.adalora_delta(self.lora_A[name], self.lora_B[name], self.lora_E[name], self.scaling[name],
                                self.ranknum[name])

    def delta_forward(self, x: Tensor, names: list[str]) -> Tensor:
        result = self.base_layer(x)
        for name in names:
            a, b, e = self.lora_A[name], self.lora_B[name], self.lora_E[name]
            h = self.lora_dropout[name](x.to(a.dtype)) @ (a * e).T @ b.T  # (..., out)
            result = result + (h * self.scaling[name] / (self.ranknum[name] + 1e-5)).to(result.dtype)
        return result


class AdaLoraState(MethodState):
    """The rank allocator, the orthogonality penalty, and the rank_pattern in saved files."""

    def __init__(self, model, adapter_name: str) -> None:
        super().__init__(model, adapter_name)
        layers = self._layers()
        self.init_bgt = sum(layer.r[adapter_name] for _, layer in layers)
        self.target_bgt = self.config.target_r * len(layers)
        self.rank_pattern: dict[str, list[bool]] | None = None  # latest mask, keys "<path>.lora_E"
        self.final = False
        self._avg: dict[tuple[str, str], Tensor] = {}
        self._unc: dict[tuple[str, str], Tensor] = {}

    @property
    def config(self) -> AdaLoraConfig:
        return self.model.peft_config[self.adapter_name]

    def _layers(self) -> list[tuple[str, AdaLoraLayer]]:
        return [(p, layer) for p, layer in self.model.adapter_layers() if self.adapter_name in layer.r]

    # ----------------------------------------------------------- regulariser
    def regularizer(self) -> Tensor | None:
        config, name = self.config, self.adapter_name
        if config.inference_mode or not config.orth_reg_weight:
            return None
        terms = []
        for _, layer in self._layers():
            terms.append(fn.orthogonality_penalty(layer.lora_A[name], rows=True))
            terms.append(fn.orthogonality_penalty(layer.lora_B[name], rows=False))
        return config.orth_reg_weight * (sum(terms) / len(terms)) if terms else None

    # ------------------------------------------------------------- allocator
    def update_and_allocate(self, global_step: int) -> None:
        config = self.config
        if config.inference_mode:
            raise LoraCliError(
                f"adapter {self.adapter_name!r} was loaded for inference; load it with is_trainable=True to train it"
            )
        end = config.total_step - config.tfinal
        if global_step < end:
            self._update_importance()
            budget, mask_now = self._budget(global_step)
            if mask_now:
                self.rank_pattern = self._mask_to_budget(budget)
        elif not self.final:
            if not self._avg:
                self._update_importance()
            self.rank_pattern = self._mask_to_budget(self.target_bgt)
            self.final = True
            self._avg, self._unc = {}, {}
        else:
            self.apply_mask(self.rank_pattern)
        if self.rank_pattern is not None:
            config.rank_pattern = self.rank_pattern  # visible in model.peft_config, as in PEFT

    def _budget(self, step: int) -> tuple[int, bool]:
        config = self.config
        if step <= config.tinit:
            return self.init_bgt, False
        span = config.total_step - config.tfinal - config.tinit
        left = 1 - (step - config.tinit) / span
        budget = int((self.init_bgt - self.target_bgt) * left**3 + self.target_bgt)
        return budget, step % config.deltaT == 0

    @torch.no_grad()
    def _update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        entries = [(path, attr, p) for path, layer in self._layers() for attr, p in layer.adapter_tensors(self.adapter_name)]
        if all(p.grad is None for _, _, p in entries):
            raise LoraCliError(
                "update_and_allocate found no gradients: call it after loss.backward() and before "
                "optimizer.zero_grad() (in a transformers Trainer callback: on_optimizer_step)"
            )
        for path, attr, p in entries:
            ipt = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
            key = (path, attr)
            if key not in self._avg or self._avg[key].shape != p.shape:
                self._avg[key], self._unc[key] = torch.zeros_like(p), torch.zeros_like(p)
            avg = b1 * self._avg[key] + (1 - b1) * ipt
            self._unc[key] = b2 * self._unc[key] + (1 - b2) * (ipt - avg).abs()
            self._avg[key] = avg

    def _score(self, path: str, attr: str) -> Tensor:
        return self._avg[(path, attr)] * self._unc[(path, attr)]

    @torch.no_grad()
    def _mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        scores = {}
        for path, _ in self._layers():
            rows_a = self._score(path, "lora_A").mean(dim=1, keepdim=True)  # (r, 1)
            cols_b = self._score(path, "lora_B").mean(dim=0).view(-1, 1)  # (r, 1)
            scores[path] = self._score(path, "lora_E").view(-1) + torch.cat([rows_a, cols_b], dim=1).sum(dim=1)
        everything = torch.cat(list(scores.values()))
        k = min(self.init_bgt - budget, everything.numel())
        threshold = torch.kthvalue(everything, k=k)[0].item() if k > 0 else float("-inf")
        pattern = {f"{path}{MASK_SUFFIX}": (~(s <= threshold)).tolist() for path, s in scores.items()}
        self.apply_mask(pattern)
        return pattern

    @torch.no_grad()
    def apply_mask(self, pattern: dict[str, list[bool]]) -> None:
        """Zero the E entries of the ranks ``pattern`` drops ({"<path>.lora_E": [keep, ...]})."""
        for path, layer in self._layers():
            e = layer.lora_E[self.adapter_name]
            keep = torch.tensor(pattern[f"{path}{MASK_SUFFIX}"], dtype=torch.bool, device=e.device)
            e.masked_fill_(~keep.view(-1, 1), 0.0)

    def state_dict(self) -> dict:
        """The allocator's running state (importance averages, phase, mask), for training
        checkpoints: a resumed run must allocate ranks as the uninterrupted run would."""
        return {
            "final": self.final,
            "rank_pattern": self.rank_pattern,
            "avg": {f"{path}:{attr}": t for (path, attr), t in self._avg.items()},
            "unc": {f"{path}:{attr}": t for (path, attr), t in self._unc.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        def keyed(tensors: dict[str, Tensor]) -> dict[tuple[str, str], Tensor]:
            return {tuple(key.rsplit(":", 1)): t for key, t in tensors.items()}

        self.final, self.rank_pattern = bool(state["final"]), state["rank_pattern"]
        self._avg, self._unc = keyed(state["avg"]), keyed(state["unc"])
        if self.rank_pattern is not None:
            self.config.rank_pattern = self.rank_pattern

    # ---------------------------------------------------------- save / load
    def export(self, state: dict[str, Tensor], config: AdaLoraConfig) -> tuple[dict[str, Tensor], AdaLoraConfig]:
        pattern = self.rank_pattern if self.rank_pattern is not None else config.rank_pattern
        if not pattern:
            return state, config
        for key, keep in pattern.items():
            path = key.removesuffix(MASK_SUFFIX)
            idx = torch.tensor(keep, dtype=torch.bool)
            for attr, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                file_key = f"{KEY_PREFIX}{path}.{attr}"
                tensor = state.get(file_key)
                if tensor is not None and tensor.shape[dim] == len(keep) != sum(keep):
                    state[file_key] = (tensor[idx] if dim == 0 else tensor[:, idx]).contiguous()
        config.rank_pattern = dict(pattern)
        return state, config

    def before_load(self, config: AdaLoraConfig) -> None:
        if not config.rank_pattern:
            return
        layers = dict(self._layers())
        renamed = {old: new for new, old in module_aliases(self.model.base_model).items()}
        normalised = {}
        for key, keep in config.rank_pattern.items():
            parts = key.split(".")
            if parts[-1] == self.adapter_name and len(parts) > 2 and parts[-2] == "lora_E":
                parts = parts[:-1]  # a live parameter name with the adapter name in it
            mapped = remap_legacy_key(KEY_PREFIX + ".".join(parts), renamed, ())
            path = mapped[len(KEY_PREFIX):].removesuffix(MASK_SUFFIX)
            if path not in layers:
                raise AdapterStateError(
                    f"rank_pattern names {key!r}, which is not an AdaLoRA-adapted module of this model; "
                    "was the adapter trained on a different architecture?"
                )
            layers[path].resize(self.adapter_name, keep)
            normalised[f"{path}{MASK_SUFFIX}"] = keep
        config.rank_pattern = normalised


register_method(AdaLoraConfig, AdaLoraLayer, prefix="lora_", state_cls=AdaLoraState)
