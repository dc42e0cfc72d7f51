"""A frozen base keeps its BatchNorm statistics while the adapter trains."""

from __future__ import annotations

import torch
from torch import nn

from lora_cli.training.trainer import freeze_norm_statistics


def test_a_frozen_batchnorm_keeps_its_statistics_in_training():
    """Running statistics are base buffers the adapter does not save: a frozen base keeps them, so
    the saved adapter reproduces the trained model. A BatchNorm that trains is left alone."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    for p in model[:2].parameters():
        p.requires_grad_(False)
    before = model[1].running_mean.clone(), model[3].running_mean.clone()
    assert freeze_norm_statistics(model) == 1
    model.train()
    model(torch.randn(8, 3, 5, 5) + 3)
    assert torch.equal(model[1].running_mean, before[0])  # frozen: unchanged
    assert not torch.equal(model[3].running_mean, before[1])  # trainable: updated as usual
