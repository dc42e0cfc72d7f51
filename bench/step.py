"""One training step of a ViT-S/16 with an adapter: loracli vs PEFT vs the frozen base.

The frozen base is the same ViT with every parameter frozen except the classifier, and
``pixel_values`` requiring grad: backward then runs through every layer, as it must when
adapters sit in every block, so base time is the unavoidable cost and the ratio
adapter / base is what the adapter itself costs. The classifier trains in all three
cases (it is ``modules_to_save`` for the adapters), so it cancels out of the ratios.
"""

from __future__ import annotations

import torch

from bench.common import (
    Case,
    build_vit,
    make_batch,
    report,
    run_interleaved,
    saved_activation_bytes,
)

TARGETS = ["q_proj", "v_proj"]
HEAD = ["classifier"]

# loracli and PEFT share field names, so one dict configures both.
METHOD_KWARGS = {
    "lora": dict(r=16, lora_alpha=16, lora_dropout=0.1),
    "loha": dict(r=16, alpha=16, module_dropout=0.1),
    "lokr": dict(r=16, alpha=16, module_dropout=0.1),
}
PEFT_CONFIGS = {"lora": "LoraConfig", "loha": "LoHaConfig", "lokr": "LoKrConfig"}


def frozen_base_case(pixels, labels) -> Case:
    model = build_vit()
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("classifier."))
    return Case("frozen base", model, pixels, labels, input_grad=True)


def loracli_case(method: str, kwargs: dict, pixels, labels) -> Case:
    from lora_cli.adapters import get_adapter_model, get_method

    config = get_method(method).config_cls(target_modules=TARGETS, modules_to_save=HEAD, **kwargs)
    return Case(f"loracli {method}", get_adapter_model(build_vit(), config), pixels, labels)


def peft_case(method: str, kwargs: dict, pixels, labels) -> Case:
    import peft

    config = getattr(peft, PEFT_CONFIGS[method])(target_modules=TARGETS, modules_to_save=HEAD, **kwargs)
    return Case(f"peft {method}", peft.get_peft_model(build_vit(), config), pixels, labels)


def available() -> list[str]:
    from lora_cli.adapters import available_methods

    return list(available_methods())


def bench_step(method: str, rounds: int, warmup: int = 2, **overrides) -> dict | None:
    """Time loracli, PEFT and the frozen base interleaved; print and return the figures."""
    if method not in available():
        print(f"\n== {method}: skipped, not in lora_cli.adapters.available_methods() yet")
        return None
    kwargs = METHOD_KWARGS[method] | overrides
    pixels, labels = make_batch()
    cases = [
        loracli_case(method, kwargs, pixels, labels),
        peft_case(method, kwargs, pixels, labels),
        frozen_base_case(pixels, labels),
    ]
    for case in cases:
        torch.manual_seed(0)
        case.saved_mb = saved_activation_bytes(case) / 2**20
    run_interleaved(cases, rounds=rounds, warmup=warmup)
    a, p, _ = (c.name for c in cases)
    shown = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    return report(
        f"{method} training step ({shown}), {rounds} interleaved rounds, {torch.get_num_threads()} threads",
        cases,
        [(a, "frozen base"), (p, "frozen base"), (a, p)],
    )
