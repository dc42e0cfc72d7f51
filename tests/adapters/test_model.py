"""AdapterModel's public API for trainers: the regularizer, and whether adapters are off."""

from __future__ import annotations

import torch

from lora_cli.adapters import AdaLoraConfig, LoraConfig, MethodState, get_adapter_model
from tests.helpers import tiny_bert


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(2, 99, (2, 8), generator=g), "labels": torch.randint(0, 3, (2,), generator=g)}


def test_regularizer_is_in_the_training_loss_unless_the_caller_adds_it():
    model = get_adapter_model(tiny_bert(), AdaLoraConfig(total_step=5, init_lora_weights=False,
                                                         target_modules=["query", "value"]))
    assert isinstance(model.method_state["default"], MethodState)
    batch = _batch()
    task = model.eval()(**batch).loss
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    penalty = model.regularizer()
    assert penalty is not None and penalty > 0
    torch.testing.assert_close(model(**batch).loss, task + penalty)
    with model.loss_without_regularizer():
        assert not model.add_regularizer_to_loss
        torch.testing.assert_close(model(**batch).loss, task)
    assert model.add_regularizer_to_loss
    assert not model.adapters_disabled
    with model.disable_adapter():
        assert model.adapters_disabled and model.regularizer() is None
    assert not model.adapters_disabled


def test_a_method_without_state_has_no_regularizer():
    model = get_adapter_model(tiny_bert(), LoraConfig(target_modules=["query"]))
    assert model.method_state == {} and model.regularizer() is None
