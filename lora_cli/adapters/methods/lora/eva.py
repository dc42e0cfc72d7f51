"""EVA: explained-variance adaptation (Paischer et al., arXiv:2410.07170).

A data-driven LoRA start. The inputs X (tokens, in) that each adapted layer sees on a few
calibration batches are decomposed by an incremental SVD; the top right-singular vectors
become the rows of A (B stays zero, so the model starts unchanged):

    X - mean(X) = U S V^T   ->   A = V^T[:r_l]          (whiten: A = V^T[:r_l] / sqrt(S[:r_l]))

The ranks r_l are redistributed across layers: every layer offers up to round(r * rho)
components, and the ``sum_l r`` components with the largest explained-variance ratio
S_i^2 / sum(var) win. A layer whose components all lose is not adapted at all. The
decomposition of a layer stops once its needed components are stable between two
batches (cosine similarity >= tau); the batches are cycled until every layer is stable.
Layers that receive the very same input (q, k and v of one attention) share one SVD.

The resulting ranks are written as ``rank_pattern`` (and, with ``adjust_scaling_factors``,
``alpha_pattern`` scaled by r_l / r so that s = alpha / r stays the same), so PEFT loads the
adapter as it loads its own EVA adapters. Only Linear and GPT-2 Conv1D layers are
decomposed; other adapted kinds keep the default start (as in PEFT).

    model = get_adapter_model(base, LoraConfig(r=8, init_lora_weights="eva", eva_config={"rho": 2}))
    ranks = initialize_eva_weights(model, batches)      # {module path: rank}
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lora_cli.adapters.methods.lora.passes import (
    Forward,
    calibrated_layers,
    check_adapter,
    forward_batch,
    layer_rows,
    resize_adapter,
    token_mask,
)
from lora_cli.adapters.methods.lora.starts import find
from lora_cli.adapters.model import rank_and_alpha
from lora_cli.errors import LoraCliError, UserInputError

MAX_PASSES = 100
"""Passes over the calibration batches before EVA gives up waiting for convergence."""

# ----------------------------------------------------------------- incremental SVD
class IncrementalSVD:
    """PCA of rows that arrive in batches (Ross et al., 2008, as in scikit-learn's
    IncrementalPCA): the previous components weighted by their singular values, the new
    centred rows and a mean-correction row are decomposed together. The SVD is a
    randomized low-rank one (q = 2k, 4 subspace iterations) under a fixed seed, and signs
    are fixed so that the largest entry of each component is positive: deterministic."""

    def __init__(self, k: int, seed: int = 42) -> None:
        self.k, self.seed = k, seed
        self.seen = 0
        self.mean: Tensor | None = None  # (in,) float64
        self.var: Tensor | None = None  # (in,) float64
        self.components: Tensor | None = None  # (k, in)
        self.singular_values: Tensor | None = None  # (k,)
        self.variance_ratio: Tensor | None = None  # (k,)
        self.converged = torch.zeros(k, dtype=torch.bool)

    def update(self, x: Tensor, tau: float) -> None:
        previous = None if self.components is None else self.components.clone()
        self._partial_fit(x.to(torch.float32).clone())
        if previous is not None:
            self.converged = torch.nn.functional.cosine_similarity(self.components, previous) >= tau

    def _partial_fit(self, x: Tensor) -> None:
        n = x.shape[0]
        total = self.seen + n
        batch_sum = x.sum(dim=0, dtype=torch.float64)
        centred = x - batch_sum / n
        batch_ss = centred.square().sum(dim=0, dtype=torch.float64) - centred.sum(dim=0, dtype=torch.float64).square() / n
        if self.components is None:
            mean = batch_sum / total
            var = batch_ss / total
            x -= mean
            stacked = x
        else:
            old_sum = self.mean * self.seen
            ratio = self.seen / n
            mean = (old_sum + batch_sum) / total
            var = (self.var * self.seen + batch_ss + ratio / total * (old_sum / ratio - batch_sum).square()) / total
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            correction = math.sqrt(self.seen / total * n) * (self.mean - batch_mean)
            stacked = torch.vstack((self.singular_values.view(-1, 1) * self.components, x, correction))
        with torch.random.fork_rng(devices=[stacked.device] if stacked.is_cuda else []):
            torch.manual_seed(self.seed)
            _, s, v = torch.svd_lowrank(stacked, q=2 * self.k, niter=4)
        vt = v.mH
        signs = torch.sign(vt[torch.arange(vt.shape[0]), vt.abs().argmax(dim=1)])
        vt = vt * signs.view(-1, 1)
        self.seen, self.mean, self.var = total, mean, var
        self.components = vt[: self.k]
        self.singular_values = s[: self.k]
        self.variance_ratio = (s.square() / torch.sum(var * total))[: self.k]


# ----------------------------------------------------------------------- EVA proper
@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    batches: Sequence[Any] | Iterable[Any],
    adapter_name: str = "default",
    forward: Forward | None = None,
    max_passes: int = MAX_PASSES,
) -> dict[str, Tensor]:
    """{module path: the layer's EVA A, (rank, in)} over ``batches`` (cycled until every
    layer converged); a rank of 0 means the layer loses its adapter. The adapters are off
    while the batches run, so the layers see the base model's activations."""
    config = check_adapter(model, adapter_name, "eva", "get_eva_state_dict")
    settings = find("eva").settings_of(config)
    batches = list(batches)
    if not batches:
        raise UserInputError("EVA needs at least one calibration batch; got none (is the training split empty?)")
    forward = forward or forward_batch
    layers = calibrated_layers(model, adapter_name)
    if not layers:
        raise UserInputError("init_lora_weights: eva adapted no Linear / Conv1D layer, so there is nothing to decompose; "
                             "target Linear layers or use another init")

    rho = float(settings["rho"])
    base_r = config.r
    if rho > 1000:  # a huge rho only means "no cap": keep the components below the largest dimension
        rho = min(rho, max(max(p.shape) for p in model.parameters() if p.dim()) // base_r)
    max_k, budget = {}, 0
    for path, layer in layers:
        r = rank_and_alpha(config, path)[0]
        max_k[path] = round(r * rho)
        budget += r
        if max_k[path] > layer.in_features:
            raise UserInputError(
                f"EVA on {path}: r * rho = {max_k[path]} components, but the layer has only {layer.in_features} "
                "inputs; lower r (or rank_pattern for this module) or eva_config.rho"
            )
    mask_value = settings["label_mask_value"] if settings["use_label_mask"] else None
    state: dict[str, Any] = {"mask": None}
    training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            leader_of = _equal_inputs(model, layers, batches[0], forward, mask_value, state)
            for group_leader in set(leader_of.values()):
                group = [p for p, lead in leader_of.items() if lead == group_leader] + [group_leader]
                top = max(max_k[p] for p in group)
                for p in group:
                    max_k[p] = top
            leaders = [p for p, _ in layers if p not in leader_of]
            order = leaders + list(leader_of)
            _check_rows(config, batches, leaders, max_k, rho, mask_value, state["rows"])  # before the passes
            svds = {p: IncrementalSVD(max_k[p]) for p in leaders}
            ranks = _decompose(model, dict(layers), batches, forward, svds, leader_of, order, max_k, budget,
                               settings, mask_value, state, max_passes)
    finally:
        model.train(training)
    out = {}
    for path in order:
        svd = svds[leader_of.get(path, path)]
        rank = ranks[path]
        if not bool(svd.converged[:rank].all()):
            raise LoraCliError(f"EVA: {path} was given rank {rank} but its components have not converged")
        u = svd.components[:rank].clone()
        if settings["whiten"]:
            u = u / svd.singular_values[:rank].sqrt().view(-1, 1)
        out[path] = u
    return out


def _equal_inputs(model, layers, batch, forward, mask_value, state) -> dict[str, str]:
    """{layer: the first layer with the same input on ``batch``} for layers that share one."""
    digests: dict[str, str] = {}

    state["rows"] = {}  # rows each layer saw in this batch: what _check_rows counts for batches without a mask

    def hook_for(path):
        def hook(module, args, output):
            rows = layer_rows(args, state["mask"]).detach().to("cpu", torch.float32).contiguous()
            digests[path] = hashlib.sha1(repr(tuple(rows.shape)).encode() + rows.numpy().tobytes()).hexdigest()
            state["rows"][path] = rows.shape[0]
        return hook

    handles = [layer.register_forward_hook(hook_for(path)) for path, layer in layers]
    try:
        state["mask"] = token_mask(batch, mask_value)
        forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    first: dict[str, str] = {}
    leader_of = {}
    for path, _ in layers:
        d = digests.get(path)
        if d is None:
            continue
        if d in first:
            leader_of[path] = first[d]
        else:
            first[d] = path
    return leader_of


def _check_rows(config, batches, leaders, max_k, rho, mask_value, first_rows) -> None:
    """A layer learns only from batches with at least as many token rows as its components (the
    others are skipped): with none, the passes would only end in "did not converge". Refuse now,
    saying what is needed. Rows are counted from the token masks (text), else as the first batch
    gave them (image batches: the first is the largest)."""
    masks = [token_mask(batch, mask_value) for batch in batches]
    counted = [int(m.sum()) for m in masks] if all(m is not None for m in masks) else None
    for path in leaders:
        seen = first_rows.get(path, 0)
        largest = max(counted) if counted is not None and seen == counted[0] else seen
        if max_k[path] > largest:
            r = rank_and_alpha(config, path)[0]
            raise UserInputError(
                f"EVA needs at least {max_k[path]} token rows in a calibration batch (r {r} x eva_config.rho {rho}) "
                f"for {path}; the largest of the {len(batches)} batch(es) gives {largest}. Give it more: more "
                "training rows or a larger training.per_device_train_batch_size, or lower r or eva_config.rho"
            )


def _decompose(model, modules, batches, forward, svds, leader_of, order, max_k, budget, settings, mask_value, state,
               max_passes) -> dict[str, int]:
    tau = float(settings["tau"])
    handles: dict[str, Any] = {}
    stable = dict.fromkeys(svds, False)

    def hook_for(path):
        def hook(module, args, output):
            rows = layer_rows(args, state["mask"])
            if rows.shape[0] < svds[path].k:
                warnings.warn(f"EVA: skipped a batch for {path}: {rows.shape[0]} tokens, fewer than its "
                              f"{svds[path].k} components", stacklevel=2)
                return
            svds[path].update(rows, tau)
        return hook

    for path in svds:
        handles[path] = modules[path].register_forward_hook(hook_for(path))
    ranks = dict(max_k)
    try:
        for step in range(max_passes * len(batches) + 1):
            batch = batches[step % len(batches)]
            for path, svd in svds.items():
                done = bool(svd.converged[: ranks[path]].all())
                if done and not stable[path]:
                    handles.pop(path).remove()
                    stable[path] = True
                elif stable[path] and not done:
                    handles[path] = modules[path].register_forward_hook(hook_for(path))
                    stable[path] = False
            if all(stable.values()):
                return ranks
            state["mask"] = token_mask(batch, mask_value)
            forward(model, batch)
            if all(svd.components is not None for svd in svds.values()):
                ranks = _distribute(svds, leader_of, order, max_k, budget)
    finally:
        for h in handles.values():
            h.remove()
    waiting = [p for p, ok in stable.items() if not ok]
    raise LoraCliError(
        f"EVA did not converge after {max_passes} passes over {len(batches)} calibration batch(es): "
        f"{', '.join(waiting[:5])} still change; give it more calibration batches (adapter.calibration_batches) "
        "or lower eva_config.tau"
    )


def _distribute(svds, leader_of, order, max_k, budget) -> dict[str, int]:
    """Ranks per layer: the ``budget`` components with the largest explained-variance ratio;
    a layer sharing its input with a leader never out-ranks it."""
    keys, values = [], []
    for path in order:
        ratios = svds[leader_of.get(path, path)].variance_ratio[: max_k[path]]
        keys += [path] * len(ratios)
        values += list(ratios)
    picked = torch.stack(values).argsort(descending=True)[:budget]
    counts = Counter(keys[i] for i in picked.tolist())
    ranks = {p: counts.get(p, 0) for p in order}
    for follower, leader in leader_of.items():
        if ranks[leader] < ranks[follower]:
            ranks[leader], ranks[follower] = ranks[follower], ranks[leader]
    return ranks


@torch.no_grad()
def load_eva_state_dict(model: nn.Module, eva_state: Mapping[str, Tensor], adapter_name: str = "default") -> dict[str, int]:
    """Set each layer's A from ``eva_state`` (its rank from A's rows, B zero) and write the
    new ranks and alphas into the adapter's rank_pattern / alpha_pattern; returns
    {module path: rank} of every layer the adapter had (0: adapter removed)."""

    config = model.peft_config[adapter_name]
    settings = find("eva").settings_of(config)
    rank_pattern, alpha_pattern, ranks, skipped = {}, {}, {}, []
    for path in list(model.targets[adapter_name]):
        r, alpha = rank_and_alpha(config, path)
        u = eva_state.get(path)
        if u is None:
            skipped.append(path)
            new_rank = r
        else:
            new_rank = u.shape[0]
            if new_rank and new_rank != r and settings["adjust_scaling_factors"]:
                alpha = alpha * new_rank / r
            if new_rank != r:
                resize_adapter(model, path, adapter_name, new_rank, alpha)
            if new_rank:
                model.base_model.get_submodule(path).lora_A[adapter_name].copy_(u)
        ranks[path] = new_rank
        if new_rank == 0:
            continue
        if new_rank != config.r:
            rank_pattern[path] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[path] = alpha
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    if any(rank == 0 for rank in ranks.values()):  # the saved targets must leave the dropped layers out
        config.target_modules = list(model.targets[adapter_name])
    model._set_trainable()
    if not model.targets[adapter_name]:
        raise LoraCliError("EVA gave every layer rank 0, so nothing is adapted; raise r or eva_config.rho")
    if skipped:
        warnings.warn(f"EVA decomposes Linear and Conv1D inputs only; {', '.join(skipped[:5])} keep the default "
                      "start (A random, B zero)", stacklevel=2)
    return ranks


def initialize_eva_weights(
    model: nn.Module,
    batches: Sequence[Any] | Iterable[Any],
    adapter_name: str = "default",
    forward: Forward | None = None,
) -> dict[str, int]:
    """EVA start for ``adapter_name`` (created with ``init_lora_weights="eva"``) from
    ``batches`` of model inputs; returns {module path: rank}. ``forward(model, batch)``
    runs one batch (default ``model(**batch)``)."""
    state = get_eva_state_dict(model, batches, adapter_name, forward)
    return load_eva_state_dict(model, state, adapter_name)
