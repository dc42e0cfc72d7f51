"""Shared harness: the benchmark ViT, one training step, interleaved timing, statistics.

Every case gets the same model (same seed, same weights) and the same batch. Cases run
round-robin (a, b, c, a, b, c, ...) after a warm-up so that load from other processes
hits all of them alike; figures are medians over rounds and ratios of those medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

VIT = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    image_size=224,
    patch_size=16,
    num_labels=101,
)
BATCH = 8


def build_vit(seed: int = 0, **overrides) -> nn.Module:
    """A ViT-S/16-sized classifier from a config (random weights, no download)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    return ViTForImageClassification(ViTConfig(**(VIT | overrides)))


def make_batch(seed: int = 0, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    size = VIT["image_size"]
    pixels = torch.randn(batch, 3, size, size, generator=gen)
    labels = torch.randint(0, VIT["num_labels"], (batch,), generator=gen)
    return pixels, labels


@dataclass
class Case:
    """One model trained with AdamW on one fixed batch."""

    name: str
    model: nn.Module
    pixels: torch.Tensor
    labels: torch.Tensor
    input_grad: bool = False
    """Make pixel_values require grad, so backward runs through every layer (frozen base)."""
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    """Process CPU time per step: less hurt than wall time when other processes take the cores."""

    def __post_init__(self) -> None:
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.trainable = sum(p.numel() for p in params)

    def step(self) -> float:
        """One forward + backward + optimizer step; returns the loss."""
        pixels = self.pixels.detach().requires_grad_(True) if self.input_grad else self.pixels
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(pixel_values=pixels, labels=self.labels).loss
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def timed_step(self) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        self.step()
        self.times.append(time.perf_counter() - start)
        self.cpu_times.append(time.process_time() - cpu)


def run_interleaved(cases: list[Case], rounds: int, warmup: int = 2) -> None:
    for _ in range(warmup):
        for case in cases:
            case.step()
    for _ in range(rounds):
        for case in cases:
            case.timed_step()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def iqr(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def ratio_spread(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """Median and IQR of per-round ratios num[i] / den[i] (rounds are paired in time)."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    lo, hi = iqr(ratios)
    return median(ratios), lo, hi


def saved_activation_bytes(case: Case) -> int:
    """Bytes autograd keeps for backward in one forward (unique storages, parameters excluded).

    A deterministic stand-in for peak training memory above the weights: what an adapter
    adds (dropout masks, low-rank intermediates) shows up here.
    """
    param_ptrs = {p.untyped_storage().data_ptr() for p in case.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_ptrs:
            seen[ptr] = storage.nbytes()
        return t

    pixels = case.pixels.detach().requires_grad_(True) if case.input_grad else case.pixels
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = case.model(pixel_values=pixels, labels=case.labels).loss
    loss.backward()
    case.optimizer.zero_grad(set_to_none=True)
    return sum(seen.values())


def report(title: str, cases: list[Case], pairs: list[tuple[str, str]], echo: Callable[[str], None] = print) -> dict:
    """Print per-case medians and the ratios of ``pairs`` (numerator, denominator); return them."""
    by_name = {c.name: c for c in cases}
    echo(f"\n== {title}")
    echo(f"{'case':<22}{'wall s':>9}{'wall IQR':>16}{'cpu s':>9}{'trainable':>12}{'saved act MB':>14}")
    out: dict = {"cases": {}, "ratios": {}}
    for c in cases:
        lo, hi = iqr(c.times)
        mb = getattr(c, "saved_mb", float("nan"))
        wall, cpu = median(c.times), median(c.cpu_times)
        echo(f"{c.name:<22}{wall:>9.3f}{f'{lo:.3f}-{hi:.3f}':>16}{cpu:>9.3f}{c.trainable:>12,}{mb:>14.1f}")
        out["cases"][c.name] = {"wall": wall, "wall_iqr": (lo, hi), "cpu": cpu, "saved_mb": mb}
    for num, den in pairs:
        a, b = by_name[num], by_name[den]
        m, lo, hi = ratio_spread(a.times, b.times)
        cm, clo, chi = ratio_spread(a.cpu_times, b.cpu_times)
        mem = getattr(a, "saved_mb", float("nan")) / getattr(b, "saved_mb", float("nan"))
        echo(
            f"  {num + ' / ' + den:<34} wall {m:.3f} (IQR {lo:.3f}-{hi:.3f})  "
            f"cpu {cm:.3f} (IQR {clo:.3f}-{chi:.3f})  saved-activation memory {mem:.2f}"
        )
        out["ratios"][f"{num}/{den}"] = {"wall": m, "wall_iqr": (lo, hi), "cpu": cm, "cpu_iqr": (clo, chi), "memory": mem}
    return out
