"""One image model's input geometry and normalisation, resolved once (as timm's data config is).

    settings = resolve(checkpoint_processor, recipe.model.processor)   # recipe over checkpoint
    settings.input_size, settings.resize, settings.interpolation, settings.mean, settings.std

Every verb reads an image model's inputs from this one frozen value: the training and eval
caches (resize, center crop), the normalisation on the CPU or the GPU, ``predict``, ``serve``,
the merge check and ``export``. It is built from the checkpoint's image processor (a
transformers processor, or timm's data config behind ``TimmWrapperImageProcessor``) with the
recipe's ``model.processor`` settings on top, for a pretrained model as for one built from a
config. :func:`to_processor` turns it back into a transformers image processor, saved in the
run's ``processor/`` folder and in merged / exported folders, so every later load sees the
same settings (a timm processor cannot save itself: its settings would otherwise be lost).

Recipe keys (``model.processor``), all optional:

- ``size``: what the model sees, an int (square) or ``{height, width}``;
- ``crop_pct``: crop / resize ratio of the eval transform (timm's name; 0.875 resizes the short
  side to 256 and cuts the middle 224; 1.0 resizes straight to ``size``); default: the
  checkpoint's, so ``size: 56`` on DINOv2 (256 -> 224) resizes to 64 and crops 56;
- ``image_mean``, ``image_std``: three floats each;
- ``interpolation``: ``bilinear``, ``bicubic`` or ``nearest``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lora_cli.errors import UserInputError
from lora_cli.recipe.schema import PROCESSOR_KEYS

Size = int | tuple[int, int]

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
PIL_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}
"""PIL resample codes (transformers' ``resample``) -> the torchvision mode the decoder uses
(torchvision resizes tensors with nearest, bilinear or bicubic only: lanczos becomes bicubic,
box and hamming bilinear)."""
RESAMPLE_OF = {"nearest": 0, "bilinear": 2, "bicubic": 3}
DEFAULT_MEAN = DEFAULT_STD = (0.5, 0.5, 0.5)
KEYS = PROCESSOR_KEYS


@dataclass(frozen=True)
class ImageSettings:
    """How an image becomes the model's input in eval, predict and serve (training crops at
    ``input_size`` too): resize to ``resize`` (an int is the short side, aspect kept; a pair is
    exact), cut the middle ``input_size``, scale to [0, 1], ``(x - mean) / std``."""

    input_size: tuple[int, int]
    resize: Size
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = DEFAULT_MEAN
    std: tuple[float, float, float] = DEFAULT_STD

    @property
    def crop(self) -> tuple[int, int] | None:
        """The center crop after the resize, or None when the resize gives the input size exactly."""
        return None if self.resize == self.input_size else self.input_size

    @property
    def crop_pct(self) -> float:
        """Crop side / resized side (1.0: no crop)."""
        side = self.resize if isinstance(self.resize, int) else min(self.resize)
        return min(self.input_size) / side

    def describe(self) -> str:
        """One line for a terminal: ``56x56 (resize short side 64, bicubic), mean [...], std [...]``."""
        resize = f"short side {self.resize}" if isinstance(self.resize, int) else f"{self.resize[0]}x{self.resize[1]}"
        return (f"{self.input_size[0]}x{self.input_size[1]} (resize {resize}, {self.interpolation}), "
                f"mean {[round(m, 4) for m in self.mean]}, std {[round(s, 4) for s in self.std]}")


def from_processor(processor: Any) -> ImageSettings:
    """The settings a checkpoint's image processor applies (transformers' or timm's)."""
    data_config = getattr(processor, "data_config", None)
    if isinstance(data_config, dict) and "input_size" in data_config:  # TimmWrapperImageProcessor
        return from_timm_config(data_config)
    size = _size_dict(getattr(processor, "size", None))
    if size.get("shortest_edge"):
        short = int(size["shortest_edge"])
        resize: Size = short
        input_size = (short, short)
        crop_pct = getattr(processor, "crop_pct", None)  # ConvNeXt: resize short / crop_pct, crop short
        if crop_pct and short < 384:
            resize = int(short / crop_pct)
    elif size.get("height") and size.get("width"):
        resize = input_size = (int(size["height"]), int(size["width"]))
    else:
        raise UserInputError(f"the image processor {type(processor).__name__} has no size loracli can use "
                             f"({size or 'none'}); set model.processor.size in the recipe")
    crop = _size_dict(getattr(processor, "crop_size", None))
    if getattr(processor, "do_center_crop", False) and crop.get("height") and crop.get("width"):
        input_size = (int(crop["height"]), int(crop["width"]))
    elif isinstance(resize, int) and input_size == (resize, resize) and not getattr(processor, "crop_pct", None):
        resize = input_size  # a short side without a crop: the input is squared as loracli always did
    normalize = getattr(processor, "do_normalize", True)
    mean = tuple(getattr(processor, "image_mean", None) or DEFAULT_MEAN) if normalize else (0.0, 0.0, 0.0)
    std = tuple(getattr(processor, "image_std", None) or DEFAULT_STD) if normalize else (1.0, 1.0, 1.0)
    resample = getattr(processor, "resample", None)
    interpolation = PIL_RESAMPLE.get(int(resample), "bilinear") if resample is not None else "bilinear"
    return ImageSettings(input_size, resize, interpolation, _three(mean), _three(std))


def _size_dict(size: Any) -> dict[str, Any]:
    if size is None:
        return {}
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, dict):
        return {k: v for k, v in size.items() if v is not None}
    return {k: getattr(size, k) for k in ("height", "width", "shortest_edge") if getattr(size, k, None) is not None}


def from_timm_config(data_config: dict[str, Any]) -> ImageSettings:
    """timm's eval transform from its data config (or a ``pretrained_cfg``, which holds the same
    keys): short side ``floor(input / crop_pct)`` (exact when not square), center crop."""
    height, width = (int(x) for x in data_config["input_size"][-2:])
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    if data_config.get("crop_mode", "center") not in ("center", None):
        crop_pct = 1.0 if data_config.get("crop_mode") == "squash" else crop_pct
    scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    resize: Size = scaled[0] if scaled[0] == scaled[1] and crop_pct != 1.0 else scaled
    if crop_pct == 1.0:
        resize = (height, width)
    interpolation = data_config.get("interpolation") or "bilinear"
    interpolation = interpolation if interpolation in INTERPOLATIONS else "bicubic"  # timm's "random" etc.
    return ImageSettings((height, width), resize, interpolation,
                         _three(data_config.get("mean") or DEFAULT_MEAN), _three(data_config.get("std") or DEFAULT_STD))


def timm_config_with(pretrained_cfg: dict[str, Any], settings: ImageSettings) -> dict[str, Any]:
    """``pretrained_cfg`` with ``settings`` in timm's keys, so timm itself transforms the same way."""
    resize = settings.resize if isinstance(settings.resize, int) else min(settings.resize)
    # timm resizes to floor(input / crop_pct): a hair over the ratio keeps float error from flooring one short
    crop_pct = 1.0 if settings.crop is None else min(settings.input_size) / (resize + 1e-4)
    return {**pretrained_cfg, "input_size": [3, *settings.input_size], "interpolation": settings.interpolation,
            "crop_pct": crop_pct, "crop_mode": "center",
            "mean": list(settings.mean), "std": list(settings.std)}


def _three(values: Any) -> tuple[float, float, float]:
    out = tuple(float(v) for v in values)
    if len(out) == 1:
        out = out * 3
    if len(out) != 3:
        raise UserInputError(f"image mean / std must have 3 values (one per RGB channel), not {len(out)}")
    return out  # type: ignore[return-value]


def with_recipe(settings: ImageSettings, overrides: dict[str, Any] | None) -> ImageSettings:
    """``settings`` with the recipe's ``model.processor`` keys on top (see the module docstring)."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(KEYS))
    if unknown:
        raise UserInputError(f"model.processor: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(KEYS)}")
    if not overrides:
        return settings
    input_size = settings.input_size
    if "size" in overrides:
        input_size = parse_size(overrides["size"])
    crop_pct = float(overrides.get("crop_pct", settings.crop_pct))
    if not 0.0 < crop_pct <= 1.0:
        raise UserInputError(f"model.processor.crop_pct: must be in (0, 1], not {crop_pct}")
    if crop_pct >= 0.9999:
        resize: Size = input_size
    else:
        resize = math.floor(min(input_size) / crop_pct + 1e-6)
        if input_size[0] != input_size[1]:
            resize = (math.floor(input_size[0] / crop_pct + 1e-6), math.floor(input_size[1] / crop_pct + 1e-6))
    interpolation = overrides.get("interpolation", settings.interpolation)
    if interpolation not in INTERPOLATIONS:
        raise UserInputError(f"model.processor.interpolation: {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    return ImageSettings(
        input_size, resize, interpolation,
        _three(overrides.get("image_mean", settings.mean)), _three(overrides.get("image_std", settings.std)),
    )


def parse_size(value: Any) -> tuple[int, int]:
    """``56`` or ``{height: 56, width: 56}`` (``{shortest_edge: 56}`` too) -> (56, 56)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return (value, value)
    if isinstance(value, dict):
        if isinstance(value.get("shortest_edge"), int) and len(value) == 1:
            return (value["shortest_edge"], value["shortest_edge"])
        height, width = value.get("height"), value.get("width")
        if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0 and len(value) == 2:
            return (height, width)
    raise UserInputError(f"model.processor.size: {value!r} is not a size; write an int (56) or {{height: 56, width: 56}}")


def resolve(processor: Any, overrides: dict[str, Any] | None) -> ImageSettings:
    """The one resolution: the checkpoint processor's settings, the recipe's over them."""
    return with_recipe(from_processor(processor), overrides)


def to_processor(settings: ImageSettings, like: Any = None) -> Any:
    """A transformers image processor that applies ``settings``: ``like`` itself when it already
    does (and can save itself), else a ``ViTImageProcessor`` (no crop) or ``BitImageProcessor``
    (short side / exact resize, center crop) holding them."""
    from transformers import BitImageProcessor, ViTImageProcessor

    if like is not None and getattr(like, "data_config", None) is None and from_processor(like) == settings:
        return like
    common = {"resample": RESAMPLE_OF[settings.interpolation], "do_normalize": True,
              "image_mean": list(settings.mean), "image_std": list(settings.std)}
    if settings.crop is None and isinstance(settings.resize, tuple):
        return ViTImageProcessor(size={"height": settings.resize[0], "width": settings.resize[1]}, **common)
    size = ({"shortest_edge": settings.resize} if isinstance(settings.resize, int)
            else {"height": settings.resize[0], "width": settings.resize[1]})
    crop = settings.crop or settings.input_size
    return BitImageProcessor(size=size, do_center_crop=True, crop_size={"height": crop[0], "width": crop[1]},
                             do_convert_rgb=True, **common)
