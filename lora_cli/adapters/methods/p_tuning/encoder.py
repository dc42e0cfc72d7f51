"""P-tuning (Liu et al., "GPT Understands, Too", https://arxiv.org/abs/2103.10385).

Virtual tokens come from a small reparameterisation network over a trained table:

    e = E[arange(T)]                        # (T, dim): embedding table, T virtual tokens
    MLP:  prompts = W3 relu(W2 relu(W1 e))  # dim -> h -> h -> dim
    LSTM: prompts = W5 relu(W4 biLSTM(e))   # dim -> 2h (both directions) -> 2h -> dim

and are prepended to the input embeddings (:mod:`lora_cli.adapters.methods.p_tuning.model`).
Saved, the network is gone: PEFT stores its output ``prompt_embeddings`` (T, dim), which
an inference-mode encoder (the table alone) plays back. h = ``encoder_hidden_size``
(default: dim). As in PEFT the MLP always has three layers and no dropout.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from torch import Tensor, nn

if TYPE_CHECKING:
    from lora_cli.adapters.methods.p_tuning.config import PromptEncoderConfig


class PromptEncoder(nn.Module):
    """Table + MLP / LSTM head; the table alone in inference mode. Submodule names are PEFT's."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Embedding(config.total_virtual_tokens, dim)  # (T, dim)
        if config.inference_mode:
            return
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
            return
        ignored = [f"{k}={getattr(config, k)}" for k, d in (("encoder_num_layers", 2), ("encoder_dropout", 0.0))
                   if getattr(config, k) != d]
        if ignored:
            warnings.warn(f"p_tuning: {', '.join(ignored)} only apply to the LSTM encoder; the MLP encoder has three "
                          "layers and no dropout (set encoder_reparameterization_type: LSTM, or remove them)",
                          UserWarning, stacklevel=4)
        self.mlp_head = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim),
        )

    def extra_repr(self) -> str:
        if not hasattr(self, "mlp_head"):
            return f"{self.embedding.num_embeddings} virtual tokens (saved prompt)"
        kind = "LSTM" if hasattr(self, "lstm_head") else "MLP"
        width = self.mlp_head[0].out_features // (2 if kind == "LSTM" else 1)
        return f"{self.embedding.num_embeddings} virtual tokens, {kind} encoder of width {width}"

    def forward(self, indices: Tensor) -> Tensor:
        x = self.embedding(indices)  # (batch, T, dim)
        lstm = getattr(self, "lstm_head", None)
        if lstm is not None:
            x = lstm(x)[0]  # (batch, T, 2h)
        head = getattr(self, "mlp_head", None)
        return x if head is None else head(x)

