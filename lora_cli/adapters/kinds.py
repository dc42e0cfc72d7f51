"""The kinds of base layer an adapter wraps, by name: what a method or a start says it adapts.

Names only, so that configs, the start table and the method list can say which layers they
mean without importing torch; :func:`lora_cli.adapters.layers.layer_kind` tells a module's kind.
"""

from __future__ import annotations

LINEAR, CONV2D, CONV3D, EMBEDDING = "linear", "conv2d", "conv3d", "embedding"
HF_CONV1D = "conv1d"
"""transformers' ``Conv1D`` (GPT-2): not a convolution but a linear map, weight stored (in, out)."""
TORCH_CONV1D = "nn_conv1d"
"""torch's ``nn.Conv1d``: a true convolution over (batch, channels, length)."""
CONVS = (TORCH_CONV1D, CONV2D, CONV3D)
"""True convolutions: weight (out, in / groups, *kernel), run by the base's ``_conv_forward``."""
MHA = "multihead_attention"
"""``nn.MultiheadAttention`` with one packed ``in_proj_weight`` (3 * dim, dim) and its ``out_proj``."""
PARAMETER = "parameter"
"""An ``nn.Parameter`` adapted directly (LoRA's ``target_parameters``)."""

SHOWN = {LINEAR: "Linear", HF_CONV1D: "GPT-2 Conv1D", TORCH_CONV1D: "Conv1d", CONV2D: "Conv2d", CONV3D: "Conv3d",
         EMBEDDING: "Embedding", MHA: "MultiheadAttention", PARAMETER: "nn.Parameter"}
"""How a message names each kind."""


def shown(kinds: tuple[str, ...]) -> str:
    """``"Linear, GPT-2 Conv1D and Embedding"``: kinds as a message lists them."""
    names = [SHOWN[k] for k in kinds]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
