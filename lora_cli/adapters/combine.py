"""Combining LoRA adapters into a new one: PEFT's ``add_weighted_adapter``.

    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "ab", combination_type="ties", density=0.5)
    model.set_adapter("ab")

Three families (the tensor math is in :mod:`lora_cli.adapters.merge_math`):

- ``cat``: A' = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B' = [B_1 B_2 ...]; exact, rank = sum of ranks.
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: combined on the
  factors, A and B separately, with weights sqrt(|w_i s_i|) (the sign on A's side); all
  ranks must agree. Only ``linear`` of a single adapter is exact.
- ``svd`` and the ``*_svd`` kinds: the deltas s_i B_i A_i are combined as full matrices
  and factorised again by a truncated SVD at ``svd_rank`` (default: the largest rank).

The new adapter gets ``r = lora_alpha = new rank`` (scale 1; with rsLoRA alpha = sqrt(r)),
the union of the sources' ``target_modules``, and is adapted exactly where any source is.
Only LoRA adapters (not DoRA) combine, as in PEFT.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lora_cli.adapters.kinds import CONVS
from lora_cli.adapters.layers import AdapterLayer
from lora_cli.adapters.merge_math import (
    COMBINATION_TYPES,
    LINEAR_KINDS,
    NEEDS_DENSITY,
    SIGN_METHODS,
    base_kind,
    combine_tensors,
    low_rank_factors,
)
from lora_cli.adapters.tensor_files import check_finite
from lora_cli.errors import UserInputError

if TYPE_CHECKING:
    from lora_cli.adapters.config import AdapterConfig


_OVERFLOW = "a float32 overflow: the weights (or the adapters' own values) are too large; use smaller weights"


class CombineError(UserInputError, ValueError):
    """Adapters or options that :meth:`AdapterCombineMixin.add_weighted_adapter` cannot combine."""


class AdapterCombineMixin:
    """``add_weighted_adapter`` for :class:`~lora_cli.adapters.model.AdapterModel`."""

    @torch.no_grad()
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        *,
        combine_modules_to_save: bool = False,
    ) -> None:
        """Add adapter ``adapter_name``, the combination of ``adapters`` with ``weights``.

        Arguments are PEFT's. Unlike PEFT, an existing ``adapter_name`` is an error (PEFT
        returns silently). ``combine_modules_to_save`` (loracli only): a module trained in
        full by several sources (a classifier head) becomes their weighted mean, weights
        normalised to sum 1; without it such adapters are refused, as in PEFT. A module
        only one source trains in full is copied from it.
        """
        adapters, weights = list(adapters), [float(w) for w in weights]
        _check_arguments(self, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                         density, majority_sign_method, combine_modules_to_save)
        if len(adapters) == 1:
            combination_type = "linear"  # PEFT: one adapter only combines linearly
        configs = [self.peft_config[name] for name in adapters]
        ranks = [max([c.r, *c.rank_pattern.values()]) if c.rank_pattern else c.r for c in configs]
        if combination_type in LINEAR_KINDS and len(set(ranks)) > 1:
            raise CombineError(
                f"combination_type={combination_type!r} combines the A and B factors entry by entry, so every "
                f"adapter needs the same rank; {', '.join(f'{a!r} has r={r}' for a, r in zip(adapters, ranks))}. "
                "Use 'cat', 'svd' or a '*_svd' type for adapters of different ranks"
            )
        if combination_type == "cat":
            new_rank = sum(ranks)
        elif combination_type in LINEAR_KINDS:
            new_rank = ranks[0]
        else:
            new_rank = svd_rank or max(ranks)
        written = _new_config(configs, new_rank)
        paths = sorted({p for name in adapters for p in self.targets.get(name, [])})
        exact = dataclasses.replace(written, target_modules=paths, exclude_modules=None, layers_to_transform=None,
                                    layers_pattern=None)
        self.add_adapter(adapter_name, exact)
        self.peft_config[adapter_name] = written
        try:
            for path, layer in self.adapter_layers():
                if adapter_name in layer.r:
                    _fill_layer(path, layer, adapter_name, adapters, weights, combination_type, new_rank,
                                svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method)
                    check_finite({path: layer.get_delta_weight(adapter_name)}, "the combined delta weight", _OVERFLOW)
            _fill_modules_to_save(self, adapter_name, adapters, weights)
        except BaseException:
            self.delete_adapter(adapter_name)
            raise


def _check_arguments(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, density,
                     majority_sign_method, combine_modules_to_save) -> None:
    if not adapters:
        raise CombineError("add_weighted_adapter needs at least one adapter name in `adapters`")
    missing = [a for a in adapters if a not in model.peft_config]
    if missing:
        raise CombineError(f"no adapter named {', '.join(map(repr, missing))}; this model has {sorted(model.peft_config)}")
    if len(set(adapters)) != len(adapters):
        raise CombineError(f"each adapter may be named once in `adapters`, got {adapters}")
    if len(weights) != len(adapters):
        raise CombineError(f"{len(adapters)} adapter(s) but {len(weights)} weight(s); give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise CombineError(f"weights must be finite numbers, got {weights}")
    if adapter_name in model.peft_config:
        raise CombineError(f"an adapter named {adapter_name!r} already exists; pick another name for the combination")
    for name in adapters:
        config = model.peft_config[name]
        if config.peft_type != "LORA":
            raise CombineError(
                f"adapter {name!r} is a {config.method} adapter: only LoRA adapters can be combined (as in PEFT); "
                "convert LoHa / LoKr adapters to LoRA first (`loracli convert RUN --to lora`)"
            )
        if getattr(config, "use_dora", False):
            raise CombineError(
                f"adapter {name!r} uses DoRA: its per-row magnitudes have no weighted combination; combine plain "
                "LoRA adapters, or merge DoRA adapters into the base one at a time"
            )
    if combination_type not in COMBINATION_TYPES:
        raise CombineError(f"combination_type {combination_type!r} is unknown; use one of {', '.join(COMBINATION_TYPES)}")
    density_ok = not isinstance(density, bool) and isinstance(density, (int, float)) and 0 <= density <= 1
    if base_kind(combination_type) in NEEDS_DENSITY and len(adapters) > 1 and not density_ok:
        raise CombineError(
            f"combination_type={combination_type!r} needs density, the fraction of entries kept, in [0, 1]; "
            f"got {density!r} (e.g. density=0.5)"
        )
    if majority_sign_method not in SIGN_METHODS:
        raise CombineError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise CombineError(f"svd_rank must be a positive integer or None, got {svd_rank!r}")
    if svd_clamp is not None and not (isinstance(svd_clamp, (int, float)) and 0 < svd_clamp <= 1):
        raise CombineError(f"svd_clamp is a quantile in (0, 1] (e.g. 0.99) or None, got {svd_clamp!r}")
    kinds = {type(model.peft_config[a].target_modules) for a in adapters}
    if str in kinds and len(kinds) > 1:
        raise CombineError("some adapters give target_modules as a regex string and others as a list; "
                           "PEFT cannot combine such adapters either: save them with the same kind of target_modules")
    if not combine_modules_to_save:
        for path, wrapper in model._wrappers():
            holders = [a for a in adapters if a in wrapper.modules_to_save]
            if len(holders) > 1:
                raise CombineError(
                    f"adapters {', '.join(map(repr, holders))} each train {path} in full (modules_to_save); such "
                    "copies have no LoRA combination. Pass combine_modules_to_save=True to average them with the "
                    "weights, or combine adapters that do not train that module"
                )


def _new_config(configs: list[AdapterConfig], rank: int) -> AdapterConfig:
    """The first source's config with the new rank, alpha, and the union of the targets."""
    first = configs[0]
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, str) for t in targets):
        union = targets[0] if len(set(targets)) == 1 else "|".join(f"({t})" for t in targets)
    else:
        union = sorted({name for t in targets for name in (t or [])})
    saved = sorted({m for c in configs for m in (c.modules_to_save or [])}) or None
    shared = {f: getattr(first, f) if all(getattr(c, f) == getattr(first, f) for c in configs) else None
              for f in ("exclude_modules", "layers_to_transform", "layers_pattern")}
    alpha = math.sqrt(rank) if first.use_rslora else rank  # scale 1: the combination carries the scales
    return dataclasses.replace(first, r=rank, lora_alpha=alpha, target_modules=union, rank_pattern={},
                               alpha_pattern={}, modules_to_save=saved, init_lora_weights=True, **shared)


def _fill_layer(path: str, layer: AdapterLayer, new: str, adapters: list[str], weights: list[float], combination_type: str,
                rank: int, clamp, full_matrices: bool, driver, density, sign_method: str) -> None:
    sources = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
    target_a, target_b = layer.factors(new)
    if combination_type == "cat":
        a = torch.cat([layer.factors(n)[0] * (w * layer.scaling[n]) for n, w in sources], dim=0)
        b = torch.cat([layer.factors(n)[1] for n, _ in sources], dim=1)
    elif combination_type in LINEAR_KINDS:
        signed = [w * layer.scaling[n] for n, w in sources]
        weights_a = [math.copysign(math.sqrt(abs(x)), x) for x in signed]
        weights_b = [math.sqrt(abs(x)) for x in signed]
        a = combine_tensors(combination_type, [layer.factors(n)[0] for n, _ in sources], weights_a, density,
                            sign_method)
        b = combine_tensors(combination_type, [layer.factors(n)[1] for n, _ in sources], weights_b, density,
                            sign_method)
    else:
        # combined in the stored layout, as PEFT does: DARE's masks follow the memory order
        deltas = [layer.to_raw(layer.get_delta_weight(n)) for n, _ in sources]
        raw = combine_tensors(base_kind(combination_type), deltas, [w for _, w in sources], density, sign_method)
        delta = layer.to_raw(raw)  # back to (out, in, ...)
        check_finite({path: delta}, "the combined delta weight", _OVERFLOW)  # an SVD of inf / NaN only fails
        flat = delta.reshape(delta.shape[0], -1) if layer.kind in CONVS else delta  # (out, in * kernel)
        a, b = low_rank_factors(flat, rank, clamp, full_matrices, driver)
        a = a.reshape(a.shape[0], *target_a.shape[1:])
        b = b.reshape(*b.shape[:2], *target_b.shape[2:])
    _write_padded(target_a, a, dim=0)
    _write_padded(target_b, b, dim=1)


def _write_padded(target: Tensor, value: Tensor, dim: int) -> None:
    """Copy ``value`` into ``target``; a smaller rank (``dim``) is padded with zeros (exact, as the scale is 1)."""
    target.zero_()
    target.narrow(dim, 0, value.shape[dim]).copy_(value.to(target.dtype))


def _fill_modules_to_save(model: AdapterCombineMixin, new: str, adapters: list[str], weights: list[float]) -> None:
    for path, wrapper in model._wrappers():
        if new not in wrapper.modules_to_save:
            continue
        holders = [(a, w) for a, w in zip(adapters, weights) if a in wrapper.modules_to_save]
        if not holders:
            continue
        total = sum(w for _, w in holders)
        if len(holders) > 1 and abs(total) < 1e-12:
            raise CombineError(
                f"the weights of the adapters that train {path} in full sum to 0, so their weighted mean is "
                "undefined; change the weights"
            )
        states = [(wrapper.modules_to_save[a].state_dict(), w / total) for a, w in holders]
        merged = {}
        for key, first in states[0][0].items():
            if first.is_floating_point() and len(states) > 1:
                merged[key] = sum(state[key].float() * share for state, share in states).to(first.dtype)
            else:
                merged[key] = first.clone()
        check_finite({f"{path}.{key}": value for key, value in merged.items()}, "the weighted mean of the heads",
                     _OVERFLOW)
        wrapper.modules_to_save[new].load_state_dict(merged)
