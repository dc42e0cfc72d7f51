"""Training on several processes: torchrun / accelerate launch, DDP or FSDP.

Every process runs the whole pipeline on the same resolved recipe and seed; the launcher
tells each one its place through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
Only rank 0 writes the run directory; barriers keep the others from running ahead of it.

What loracli chooses for the user (each only when the recipe leaves the key out):

- ``use_cpu: true`` and ``ddp_backend: gloo`` when there is no CUDA device: accelerate
  only sets up a multi-process CPU run (gloo) when asked for the CPU explicitly.
- ``ddp_find_unused_parameters``: False, because the adapters and the trained head take
  part in every forward and DDP then skips a graph walk per step; True when the adapter
  has ``module_dropout`` > 0 (LoHa/LoKr skip whole adapters at random, per rank), which
  leaves parameters without a gradient on some steps.
- ``fsdp_config.transformer_layer_cls_to_wrap`` for models (ViT) whose input embeddings
  sit inside a module that the default wrapping policy would shard as a unit: accelerate's
  FSDP2 preparation shards the input embeddings again on their own and fails.
- FSDP is dropped, with a warning, where accelerate cannot run it (no GPU/accelerator):
  the run goes on as DDP.

Sharded models (FSDP, DeepSpeed ZeRO-3) keep a slice of each adapter tensor per process:
saving gathers the full tensors first, loading (--resume, load_best_model_at_end) writes
the full tensors back into the slices.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from lora_cli.errors import LoraCliError


def world_size() -> int:
    return max(int(os.environ.get("WORLD_SIZE", "1")), 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every process (a no-op when the run is not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def distributed_defaults(kwargs: dict[str, Any], adapter_config) -> dict[str, Any]:
    """``kwargs`` (the recipe's ``training`` section) plus what a multi-process run needs.

    ``adapter_config`` is the run's engine config. Keys the recipe sets win. (Methods that
    cannot be sharded are refused by the recipe loader.)
    """
    sharding = bool(kwargs.get("fsdp") or kwargs.get("deepspeed"))
    out = dict(kwargs)
    if out.get("fsdp") and not accelerate_runs_fsdp():
        warnings.warn(
            "training.fsdp: accelerate runs FSDP only on GPUs/accelerators; without one this run trains "
            "without FSDP (DDP when there are several processes: a full copy of the model in each)",
            stacklevel=2,
        )
        out.pop("fsdp")
        out.pop("fsdp_config", None)
        sharding = bool(out.get("deepspeed"))
    if world_size() <= 1:
        return out
    if not torch.cuda.is_available():
        out.setdefault("use_cpu", True)
        out.setdefault("ddp_backend", "gloo")
    if not sharding:
        out.setdefault("ddp_find_unused_parameters", float(getattr(adapter_config, "module_dropout", 0.0) or 0.0) > 0.0)
    return out


def accelerate_runs_fsdp() -> bool:
    """accelerate prepares FSDP on CUDA and other accelerators, never on the CPU alone."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())


def fsdp_wrap_defaults(kwargs: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """``kwargs`` with the layer classes FSDP should wrap, where the default would fail.

    Without ``transformer_layer_cls_to_wrap`` accelerate wraps every class the model lists
    in ``_no_split_modules``, then shards the input embeddings as a unit of their own. When
    the embeddings are inside one of those classes (ViT: the patch embedding inside
    ``ViTEmbeddings``) their parameters are already sharded and ``fully_shard`` fails; leaving
    that enclosing class out of the list avoids it. Recipes that set the key keep theirs.
    """
    if not kwargs.get("fsdp"):
        return kwargs
    config = kwargs.get("fsdp_config")
    if isinstance(config, str | os.PathLike):  # a JSON file: the user's own, complete choice
        return kwargs
    config = dict(config or {})
    if config.get("transformer_layer_cls_to_wrap") or config.get("auto_wrap_policy"):
        return kwargs
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if not no_split or embeddings is None:
        return kwargs
    enclosing = {
        type(module).__name__
        for module in model.modules()
        if module is not embeddings and type(module).__name__ in no_split
        and any(sub is embeddings for sub in module.modules())
    }
    if not enclosing:
        return kwargs
    wrap = [name for name in no_split if name not in enclosing]
    if not wrap:
        return kwargs
    config["transformer_layer_cls_to_wrap"] = wrap
    return {**kwargs, "fsdp_config": config}


def raise_explained(exc: RuntimeError) -> None:
    """Turn DDP's "unused parameters" failure into a LoraCliError that names the recipe key."""
    if "Expected to have finished reduction" in str(exc):
        raise LoraCliError(
            "DDP: some adapter parameters got no gradient in a step (a targeted module the model's forward "
            "never calls, or adapters skipped at random); set training.ddp_find_unused_parameters: true"
        ) from exc


def is_sharded(trainer) -> bool:
    """True when the model's parameters are split across processes (FSDP, DeepSpeed ZeRO-3)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    if getattr(trainer, "is_deepspeed_enabled", False):
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        return getattr(plugin, "zero_stage", 0) == 3
    return False


def sharded_adapter_state(trainer) -> dict[str, torch.Tensor] | None:
    """Full copies of the adapter's tensors when the model is sharded, else None.

    A sharded model (FSDP, DeepSpeed ZeRO-3) keeps only a slice of each tensor on each
    process, so reading its parameters saves empty or partial tensors (a known failure of
    adapter tools under ZeRO-3). Every process must call this: the gathering is collective.
    None means "not sharded: the live tensors are complete".
    """
    if not is_sharded(trainer):
        return None
    adapter = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    if getattr(trainer, "is_fsdp_enabled", False):
        return full_adapter_state(trainer.model_wrapped, adapter)
    import deepspeed  # only reached under DeepSpeed ZeRO-3, where it is installed

    params = [p for p in adapter.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.clone() for k, v in adapter.get_adapter_state_dict().items()}


def load_sharded_adapter_state(trainer, state: dict[str, torch.Tensor]) -> bool:
    """Copy full adapter tensors into a sharded model, each process keeping its slice.

    Returns False, doing nothing, when the model is not sharded. Every process must call
    this with the same ``state``: the copies go through collectives.
    """
    if not is_sharded(trainer):
        return False
    adapter = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    if getattr(trainer, "is_fsdp_enabled", False):
        load_into_fsdp(trainer.model_wrapped, adapter, state)
        return True
    import deepspeed  # only reached under DeepSpeed ZeRO-3, where it is installed

    params = [p for p in adapter.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):  # rank 0's values are scattered back
        adapter.load_adapter_state_dict(state)
    return True


def load_into_fsdp(wrapped: torch.nn.Module, adapter, state: dict[str, torch.Tensor]) -> None:
    """``adapter.load_adapter_state_dict(state)`` for a model inside FSDP1 or FSDP2 (collective).

    FSDP1: the full parameters are summoned, written, and their slices written back.
    FSDP2: each full tensor is split the way its DTensor parameter is (``distribute_tensor``)
    and the local slice copied in. ``state`` is the raw layout loracli checkpoints
    (``get_adapter_state_dict``), whose keys name the live tensors one to one.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(wrapped, FSDP) or any(isinstance(m, FSDP) for m in wrapped.modules()):
        with FSDP.summon_full_params(wrapped, writeback=True, rank0_only=False):
            adapter.load_adapter_state_dict(state)
        return
    live = adapter.live_adapter_tensors(adapter.active_adapter)
    if live.keys() != state.keys():
        odd = sorted(live.keys() ^ state.keys())
        raise LoraCliError(
            f"the checkpoint's adapter tensors do not match the model's ({len(odd)} differ, e.g. {odd[0]}); "
            "was it written by another recipe? Resume with the recipe that started the run"
        )
    with torch.no_grad():
        for key in sorted(state):  # the same order on every process: distribute_tensor is a collective
            target, tensor = live[key], state[key]
            if tuple(target.shape) != tuple(tensor.shape):
                raise LoraCliError(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
            if isinstance(target, DTensor):
                piece = distribute_tensor(tensor.to(target.dtype), target.device_mesh, target.placements)
                target.to_local().copy_(piece.to_local())
            else:
                target.copy_(tensor.to(dtype=target.dtype, device=target.device))


def full_adapter_state(wrapped: torch.nn.Module, adapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors in full, as CPU copies, from an FSDP-wrapped model (collective).

    ``wrapped``: the FSDP-wrapped model (FSDP1 root, or the ``fully_shard``-ed module);
    ``adapter``: the AdapterModel inside it.
    """
    from torch.distributed.tensor import DTensor

    out = {}
    with gather_fsdp(wrapped):
        for key, tensor in adapter.get_adapter_state_dict().items():
            if isinstance(tensor, DTensor):  # FSDP2 module state dicts stay sharded
                tensor = tensor.full_tensor()
            out[key] = tensor.detach().to("cpu").clone()
    return out


@contextlib.contextmanager
def gather_fsdp(model: torch.nn.Module) -> Iterator[None]:
    """Full parameter values inside an FSDP model, on every process (a collective).

    FSDP1 (``FullyShardedDataParallel``) flattens and shards parameters: its own
    ``summon_full_params`` restores them. FSDP2 (``fully_shard``) turns parameters into
    DTensor shards: ``unshard`` registers the full tensors until ``reshard``.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP) or any(isinstance(m, FSDP) for m in model.modules()):
        with FSDP.summon_full_params(model, writeback=False, rank0_only=False):
            yield
        return
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in sharded:
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()
