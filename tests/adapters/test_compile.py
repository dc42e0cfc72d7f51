"""Adapted models compile whole: ``training.torch_compile`` gets one graph, no breaks.

Checked with ``torch._dynamo.explain`` (the count of graph breaks) and by compiling with
``fullgraph=True`` (which fails on any break) through AOTAutograd (``aot_eager``: the same
graph capture and backward as inductor, without generating C++), gradients compared
with eager mode. LoRA's dropout takes torch's own dropout when compiled (the eager
CPU mask from raw random words is an in-place ``random_``, which would break the graph).
"""

from __future__ import annotations

import pytest
import torch

from lora_cli.adapters import LoHaConfig, LoKrConfig, LoraConfig, get_adapter_model
from tests.helpers import tiny_vit

TARGETS = ["query", "value"]
CONFIGS = {
    "lora": LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False),
    "dora": LoraConfig(r=4, target_modules=TARGETS, use_dora=True, init_lora_weights=False),
    "loha": LoHaConfig(r=4, target_modules=TARGETS, init_weights=False),
    "lokr": LoKrConfig(r=4, target_modules=TARGETS, init_weights=False),
}


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0, 1])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_and_backward_compile_without_graph_breaks(name):
    torch._dynamo.reset()
    model = get_adapter_model(tiny_vit(), CONFIGS[name])
    x, y = _batch()
    explained = torch._dynamo.explain(lambda px: model(pixel_values=px, labels=y).loss)(x)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1

    model(pixel_values=x, labels=y).loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert eager and all(g.abs().sum() > 0 for g in eager.values())
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(pixel_values=x, labels=y).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, eager[n], atol=1e-5, rtol=1e-4)


def test_lora_dropout_in_training_mode_compiles_whole():
    torch._dynamo.reset()
    model = get_adapter_model(tiny_vit(), LoraConfig(r=4, target_modules=TARGETS, lora_dropout=0.1))
    model.train()
    x, y = _batch()
    explained = torch._dynamo.explain(lambda px: model(pixel_values=px, labels=y).loss)(x)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    loss = torch.compile(model, backend="aot_eager", fullgraph=True)(pixel_values=x, labels=y).loss
    loss.backward()
    assert torch.isfinite(loss)
