"""Re-export of :mod:`lora_cli.tasks.images`, where the one image loader of every verb lives.

``train`` / ``eval`` (the task's transforms) and ``predict`` read images with the same
:func:`load_image`, so they see the same pixels; this module keeps the old import path.
"""

from __future__ import annotations

from lora_cli.tasks.images import (
    IMAGE_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    ImageLoadError,
    check_image,
    expand_inputs,
    load_image,
    to_rgb,
    walk_files,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "ImageLoadError",
    "check_image",
    "expand_inputs",
    "load_image",
    "to_rgb",
    "walk_files",
]
