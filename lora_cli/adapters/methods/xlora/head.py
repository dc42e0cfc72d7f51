"""X-LoRA's gating head: hidden states -> per-token (and per-layer) weights of the experts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lora_cli.adapters.config import AdapterConfig


class XLoraClassifier(nn.Module):
    """The gating head: hidden state (batch, seq, hidden) -> scalings (batch, seq, layers, experts).

    ``xlora_depth`` Linear layers (ReLU and, with ``xlora_dropout_p`` > 0, dropout between
    them; ``xlora_size`` wide), the last one giving one logit per expert, or per expert and
    layer with ``layerwise_scalings``; then a softmax at ``softmax_temperature``.
    """

    def __init__(self, config: AdapterConfig, hidden_size: int, n_experts: int, n_layers: int,
                 dtype: torch.dtype, device: torch.device | None) -> None:
        super().__init__()
        self.config, self.n_experts, self.n_layers = config, n_experts, n_layers
        modules: list[nn.Module] = []
        width = hidden_size
        for _ in range(config.xlora_depth - 1):
            modules += [nn.Linear(width, config.xlora_size), nn.ReLU()]
            if config.xlora_dropout_p > 0:
                modules.append(nn.Dropout(config.xlora_dropout_p))
            width = config.xlora_size
        modules.append(nn.Linear(width, n_experts * (n_layers if config.layerwise_scalings else 1)))
        self.layers = nn.Sequential(*modules).to(device=device, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[-1].weight.dtype

    def forward(self, hidden: Tensor) -> Tensor:
        batch, seq = hidden.shape[:2]
        logits = self.layers(hidden.to(self.dtype))
        if not self.config.layerwise_scalings:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(batch, seq, self.n_layers, self.n_experts)
        if self.config.enable_softmax:
            scalings = torch.softmax(scalings / self.config.softmax_temperature, dim=-1)
        return scalings

    def dummy(self, batch: int, seq: int, device: torch.device) -> Tensor:
        """The scaling pass's scalings: every expert at ``scaling_pass_value``."""
        shape = (batch, seq, self.n_layers, self.n_experts)
        return torch.full(shape, float(self.config.scaling_pass_value), device=device, dtype=self.dtype)

    def layer_weights(self, scalings: Tensor, layer: int) -> Tensor:
        """(batch, seq, experts) weights of LoRA layer ``layer``: the top ``top_k_lora`` kept
        (the rest zero), renormalised by a softmax over those with ``enable_softmax_topk``."""
        weights = scalings[:, :, layer, :]
        k = self.config.top_k_lora
        if k is not None:
            keep = torch.zeros_like(weights, dtype=torch.bool)
            keep.scatter_(-1, torch.topk(weights, k=k, dim=-1).indices, True)
            weights = weights * keep.to(weights.dtype)
        if self.config.enable_softmax_topk:
            nonzero = weights != 0
            weights = torch.softmax(weights.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
        return weights
