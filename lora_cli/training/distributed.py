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
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from lora_cli.errors import LoraCliError, UserInputError


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


def distributed_defaults(kwargs: dict[str, Any], adapter: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` (the recipe's ``training`` section) plus what a multi-process run needs.

    ``adapter`` is the recipe's adapter section as plain data. Keys the recipe sets win.
    """
    sharding = bool(kwargs.get("fsdp") or kwargs.get("deepspeed"))
    if sharding and adapter.get("method") == "adalora":
        raise UserInputError(
            "adapter.method adalora with training.fsdp/deepspeed: AdaLoRA's rank allocator scores whole "
            "gradients, which FSDP and DeepSpeed split across processes; train AdaLoRA with plain DDP "
            "(remove training.fsdp / training.deepspeed) or pick method lora"
        )
    if world_size() <= 1:
        return kwargs
    out = dict(kwargs)
    if not torch.cuda.is_available():
        out.setdefault("use_cpu", True)
        out.setdefault("ddp_backend", "gloo")
        if out.get("fsdp"):
            warnings.warn(
                "training.fsdp: accelerate runs FSDP only on GPUs/accelerators; this CPU run falls back to "
                "DDP (a full copy of the model in every process)",
                stacklevel=2,
            )
            sharding = bool(out.get("deepspeed"))
    if not sharding:
        out.setdefault("ddp_find_unused_parameters", float(adapter.get("module_dropout") or 0.0) > 0.0)
    return out


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
