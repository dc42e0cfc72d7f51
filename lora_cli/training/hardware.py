"""TrainingArguments defaults chosen from the machine, each only where the recipe is silent.

- Image tasks: DataLoader workers from the CPU count (none below 3 cores per process,
  else cores - 1, at most 16), persistent workers, prefetch, pinned memory on CUDA
  (:func:`lora_cli.tasks.data.image_batches.loader_defaults`).
- CUDA with TF32 tensor cores (compute capability 8.0+, Ampere and later): ``tf32: true``,
  float32 matmuls on TF32 tensor cores, as the fast recipes of the field do.

Also the transformers defaults loracli keeps on purpose: fused AdamW (``optim:
adamw_torch_fused``) and SDPA attention (``attn_implementation: sdpa``) wherever torch
has them.
"""

from __future__ import annotations

from typing import Any

import torch

from lora_cli.task_kinds import TaskKind
from lora_cli.tasks.data.image_batches import loader_defaults


def tf32_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def hardware_defaults(kwargs: dict[str, Any], kind: TaskKind, processes: int = 1) -> dict[str, Any]:
    """``kwargs`` (the recipe's training section) plus the machine's defaults; the recipe's keys win."""
    out = dict(kwargs)
    cuda = torch.cuda.is_available()
    if kind.inputs == "images":
        for key, value in loader_defaults(cuda=cuda, processes=processes).items():
            out.setdefault(key, value)
    if tf32_capable():
        out.setdefault("tf32", True)
    return out
