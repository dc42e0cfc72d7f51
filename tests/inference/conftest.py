"""Fixtures for the inference tests: a tiny ViT with a trained-looking adapter and head."""

from __future__ import annotations

import pytest
import torch

from lora_cli.adapters import available_methods, get_adapter_model, get_method
from tests.helpers import CLASSES, tiny_vit

ID2LABEL = dict(enumerate(CLASSES))

# Method-specific fields; every method also gets target_modules and modules_to_save.
METHOD_FIELDS = {
    "lora": {"r": 4, "lora_alpha": 8},
    "loha": {"r": 4, "alpha": 8},
    "lokr": {"r": 4, "alpha": 8},
    "adalora": {"init_r": 4, "target_r": 2, "lora_alpha": 8, "total_step": 10},
}
METHODS = [m for m in available_methods() if m in METHOD_FIELDS]


def make_adapter_model(method: str = "lora", seed: int = 0, **extra):
    """Tiny ViT, adapters on query/value, head trained in full, all adapter weights non-zero."""
    base = tiny_vit(num_labels=len(CLASSES), seed=seed)
    base.config.id2label = dict(ID2LABEL)
    base.config.label2id = {v: k for k, v in ID2LABEL.items()}
    config_cls = get_method(method).config_cls
    config = config_cls(target_modules=["query", "value"], modules_to_save=["classifier"],
                        **METHOD_FIELDS[method], **extra)
    model = get_adapter_model(base, config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.adapter_parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.fixture
def adapter_model():
    return make_adapter_model("lora")


@pytest.fixture
def processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": 32, "width": 32})
