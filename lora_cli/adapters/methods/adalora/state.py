"""AdaLoRA's per-model state: the rank allocator, the orthogonality penalty, and the
``rank_pattern`` written into saved files (see :mod:`lora_cli.adapters.methods.adalora.layer`
for the formulas)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lora_cli.adapters import functional as fn
from lora_cli.adapters.model import MethodState
from lora_cli.adapters.state import KEY_PREFIX, remap_legacy_key
from lora_cli.adapters.targeting import module_aliases
from lora_cli.errors import AdapterStateError, LoraCliError

if TYPE_CHECKING:
    from lora_cli.adapters.methods.adalora.config import AdaLoraConfig
    from lora_cli.adapters.methods.adalora.layer import AdaLoraLayer

MASK_SUFFIX = ".lora_E"


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
        # AdaLoRA's own layers only (those holding E for this adapter): trainable-token layers beside them have none
        return [(p, layer) for p, layer in self.model.adapter_layers()
                if self.adapter_name in getattr(layer, "lora_E", ())]

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
