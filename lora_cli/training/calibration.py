"""The calibration pass of `loracli train`: the data-driven starts (EVA, CorDA, LoRA-GA).

Such an init needs the layer inputs (EVA, CorDA) or gradients (LoRA-GA) of a few batches
before training. They are drawn from the recipe's TRAINING split, through the same
collator the Trainer uses, in an order fixed by the recipe's seed, so a run calibrates
the same way every time. ``adapter.calibration_batches`` sets how many (default 16).

What was computed is written into the run directory, so `--resume` never recomputes it:

    calibration.json           init, batches, batch size, seed, wall time, per-layer rank and alpha
    calibration.safetensors    the start of every adapted layer: "<path>.lora_A" / "<path>.lora_B"

On --resume the layers get the recorded ranks and starts back, and an init that rewrites
the base (CorDA, LoRA-GA) rewrites it again from those factors (W <- W - s B0 A0, with the
init's own expression, so the base is the same bit for bit). The delivered adapter is
saved relative to the original base (:mod:`lora_cli.adapters.methods.lora.base_rewrites`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from lora_cli import atomic
from lora_cli.adapters.methods.lora import starts
from lora_cli.adapters.methods.lora.passes import forward_batch, resize_adapter
from lora_cli.adapters.model import rank_and_alpha
from lora_cli.errors import LoraCliError, UserInputError

DATA_DRIVEN = starts.DATA_DRIVEN
DEFAULT_BATCHES = 16
BATCHES_KEY = "calibration_batches"
"""The recipe key (adapter section) for the number of calibration batches."""
CALIBRATION_FILE = "calibration.json"
FACTORS_FILE = "calibration.safetensors"


@dataclass
class Calibration:
    """What a calibration pass computed (the JSON side of the record)."""

    init: str
    batches: int
    batch_size: int
    seed: int
    seconds: float
    ranks: dict[str, int]
    alphas: dict[str, float] = field(default_factory=dict)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    factors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def init_of(model, adapter_name: str = "default") -> str | None:
    """The data-driven init of the adapter, or None when it needs no calibration."""
    init = getattr(model.peft_config[adapter_name], "init_lora_weights", None)
    start = starts.find(init) if isinstance(init, str) else None
    return init if start is not None and start.needs_data else None


def calibration_batches(dataset, collate, batch_size: int, n: int, seed: int) -> list[Any]:
    """``n`` batches of the training split (fewer when it is smaller), shuffled under ``seed``."""
    if len(dataset) == 0:
        raise UserInputError("the calibration pass needs training rows, and the training split is empty")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate,
                        num_workers=0)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) >= n:
            break
    return out


class _Progress:
    """The batches, moved to ``device``, advancing a progress bar at each one a pass reads."""

    def __init__(self, batches: list[Any], device: torch.device, progress: Progress | None = None,
                 task: Any = None) -> None:
        self.batches, self.device, self.progress, self.task = batches, device, progress, task

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Any:
        return self._moved(self.batches[i])

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            yield self._moved(batch)

    def _moved(self, batch: Any) -> Any:
        if self.progress is not None:
            self.progress.advance(self.task)
        if isinstance(batch, dict):
            return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch.to(self.device) if isinstance(batch, torch.Tensor) else batch


def run_calibration(model, batches: list[Any], *, seed: int, batch_size: int, console: Console | None = None,
                    adapter_name: str = "default") -> Calibration:
    """Run the adapter's data-driven init on ``batches``; the model is changed in place."""
    init = init_of(model, adapter_name)
    if init is None:
        raise LoraCliError("run_calibration: the adapter's init needs no calibration")
    device = next(model.parameters()).device
    start = starts.find(init)
    engine = start.calibration()
    repeats = start.repeats_batches  # EVA reads the batches until it converges: its forward passes are counted
    console = console or Console(stderr=True)
    progress = Progress(
        SpinnerColumn() if repeats else TextColumn(""),
        TextColumn(f"[bold]calibrate[/bold] {init}"),
        BarColumn(bar_width=16),
        MofNCompleteColumn() if not repeats else TextColumn("{task.completed:.0f} forward passes"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    start = time.perf_counter()
    torch.manual_seed(seed)  # LoRA-GA's and any randomised step: the same under the same seed
    with progress:
        task = progress.add_task("calibrate", total=None if repeats else len(batches))
        if not repeats:  # each batch is read once: counted as it is read
            ranks = engine(model, _Progress(batches, device, progress, task), adapter_name=adapter_name)
        else:  # every forward pass is counted

            def forward(m, batch):
                out = forward_batch(m, batch)
                progress.advance(task)
                return out

            ranks = engine(model, _Progress(batches, device), adapter_name=adapter_name, forward=forward)
    seconds = time.perf_counter() - start
    record = _record(model, init, len(batches), batch_size, seed, seconds, adapter_name)
    if isinstance(ranks, dict):  # layers EVA gave rank 0 are no longer adapted: shown with 0
        record.ranks = {p: int(ranks.get(p, record.ranks.get(p, 0))) for p in {**ranks, **record.ranks}}
    return record


def _record(model, init, batches, batch_size, seed, seconds, adapter_name) -> Calibration:
    ranks, alphas, factors = {}, {}, {}
    for path, layer in model.adapter_layers():
        if adapter_name not in layer.r or not hasattr(layer, "lora_A") or adapter_name not in layer.lora_A:
            continue
        ranks[path] = layer.r[adapter_name]
        alphas[path] = _alpha(model, path, adapter_name)
        factors[f"{path}.lora_A"] = layer.lora_A[adapter_name].detach().cpu().contiguous().clone()
        factors[f"{path}.lora_B"] = layer.lora_B[adapter_name].detach().cpu().contiguous().clone()
    config = model.peft_config[adapter_name]
    return Calibration(init=init, batches=batches, batch_size=batch_size, seed=seed, seconds=round(seconds, 3),
                       ranks=ranks, alphas=alphas, rank_pattern=dict(config.rank_pattern),
                       alpha_pattern=dict(config.alpha_pattern), factors=factors)


def _alpha(model, path, adapter_name) -> float:
    return float(rank_and_alpha(model.peft_config[adapter_name], path)[1])


# ------------------------------------------------------------------ the run record
def save_calibration(run_dir: Path, record: Calibration) -> None:
    data = asdict(record)
    data.pop("factors")
    with atomic.atomic_file(run_dir / FACTORS_FILE) as tmp:
        save_file(record.factors, str(tmp), metadata={"format": "pt"})
    atomic.write_text(run_dir / CALIBRATION_FILE, json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_calibration(run_dir: Path) -> Calibration | None:
    """The run's recorded calibration, or None when it has none."""
    path = run_dir / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        factors = load_file(str(run_dir / FACTORS_FILE))
        return Calibration(**data, factors=factors)
    except (OSError, ValueError, TypeError) as exc:
        raise UserInputError(
            f"--resume: the calibration record in {run_dir} ({CALIBRATION_FILE}, {FACTORS_FILE}) cannot be read "
            f"({exc}); train again without --resume (use --overwrite) to recompute it"
        ) from None


@torch.no_grad()
def restore_calibration(model, record: Calibration, adapter_name: str = "default") -> None:
    """Put the recorded start back: ranks, alphas, A and B, and the base rewrite."""
    init = init_of(model, adapter_name)
    if init != record.init:
        raise UserInputError(f"--resume: the run was calibrated for init_lora_weights {record.init!r}, the recipe asks "
                             f"for {init!r}; train again with --overwrite")
    apply = starts.find(init).apply_function()  # the start's own expression for the base, bit for bit
    for path in list(model.targets[adapter_name]):
        rank = record.ranks.get(path, 0)
        layer = model.base_model.get_submodule(path)
        if rank != layer.r[adapter_name] or path in record.alphas:
            resize_adapter(model, path, adapter_name, rank, record.alphas.get(path, 0.0))
        if rank == 0:
            continue
        a, b = record.factors.get(f"{path}.lora_A"), record.factors.get(f"{path}.lora_B")
        if a is None or b is None:
            raise UserInputError(f"--resume: {FACTORS_FILE} has no start for {path}; train again with --overwrite")
        layer = model.base_model.get_submodule(path)
        apply(layer, adapter_name, a.to(layer.lora_A[adapter_name].device), b.to(layer.lora_B[adapter_name].device))
    config = model.peft_config[adapter_name]
    config.rank_pattern, config.alpha_pattern = dict(record.rank_pattern), dict(record.alpha_pattern)
    if any(rank == 0 for rank in record.ranks.values()):  # as EVA left it: the dropped layers are no target
        config.target_modules = list(model.targets[adapter_name])
    model._set_trainable()


def rank_lines(record: Calibration) -> list[str]:
    """One line per layer for the terminal: path, rank, alpha."""
    width = max((len(p) for p in record.ranks), default=0)
    return [f"{p.ljust(width)}  r={r:<3d} alpha={record.alphas.get(p, 0):g}" for p, r in record.ranks.items()]
