"""Micro-benchmark: forward + backward of one adapted Linear (ViT-S q_proj shape).

Much faster than the full step and steadier on a loaded machine, so it is the loop to
iterate on when tuning ``delta_forward``. Same rules as the step benchmark: interleaved
rounds, medians, ratios against the bare base layer whose input requires grad.

    python -m bench.layer [--rounds 40] [--method lora] [--dropout 0.1]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from bench.common import median, ratio_spread

TOKENS, FEATURES = 8 * 197, 384
PEFT_CONFIGS = {"lora": "LoraConfig", "loha": "LoHaConfig", "lokr": "LoKrConfig"}


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj = nn.Linear(FEATURES, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x)


def _kwargs(method: str, dropout: float) -> dict:
    if method == "lora":
        return dict(r=16, lora_alpha=16, lora_dropout=dropout, init_lora_weights=False)
    return dict(r=16, alpha=16, module_dropout=dropout, init_weights=False)


def layers(method: str, dropout: float) -> dict[str, nn.Module]:
    import peft

    from lora_cli.adapters import get_adapter_model, get_method

    kwargs = _kwargs(method, dropout)
    ours = get_adapter_model(_Holder(), get_method(method).config_cls(target_modules=["q_proj"], **kwargs))
    theirs = peft.get_peft_model(_Holder(), getattr(peft, PEFT_CONFIGS[method])(target_modules=["q_proj"], **kwargs))
    base = _Holder().requires_grad_(False)
    return {"loracli": ours.train(), "peft": theirs.train(), "base": base.train()}


def fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    x = x.detach().requires_grad_(True)
    module(x).backward(grad)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.layer")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--method", default="lora", choices=sorted(PEFT_CONFIGS))
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mods = layers(args.method, args.dropout)
    x = torch.randn(8, 197, FEATURES)
    grad = torch.randn(8, 197, FEATURES)
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = {(clock, name): [] for clock in clocks for name in mods}
    for i in range(args.rounds + 3):
        for name, module in mods.items():
            start = {clock: read() for clock, read in clocks.items()}
            fwd_bwd(module, x, grad)
            if i >= 3:
                for clock, read in clocks.items():
                    times[clock, name].append(read() - start[clock])
    threads = torch.get_num_threads()
    print(f"{args.method} layer ({TOKENS}x{FEATURES}, dropout {args.dropout}), {args.rounds} rounds, {threads} threads")
    for clock in clocks:
        shown = "   ".join(f"{name} {median(times[clock, name]) * 1e3:.2f} ms" for name in mods)
        print(f"  {clock:<4}  medians: {shown}")
        for num, den in (("loracli", "base"), ("peft", "base"), ("loracli", "peft")):
            m, lo, hi = ratio_spread(times[clock, num], times[clock, den])
            print(f"        {num}/{den} {m:.3f} (IQR {lo:.3f}-{hi:.3f})")


if __name__ == "__main__":
    main()
