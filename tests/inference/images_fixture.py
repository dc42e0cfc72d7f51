"""A folder of images as users have them: mixed modes, EXIF rotation, one corrupt file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import class_image


def make_user_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = {}

    paths["jpeg"] = folder / "a_photo.jpg"
    class_image(0, rng, 48).save(paths["jpeg"], quality=90)

    rgba = class_image(1, rng, 32).convert("RGBA")
    alpha = np.full((32, 32), 255, dtype=np.uint8)
    alpha[:, :16] = 0  # left half fully transparent, its colour under the alpha is black
    rgba.putalpha(Image.fromarray(alpha))
    arr = np.asarray(rgba).copy()
    arr[:, :16, :3] = 0
    paths["alpha"] = folder / "b_alpha.png"
    Image.fromarray(arr, mode="RGBA").save(paths["alpha"])

    paths["gray"] = folder / "c_gray.png"
    class_image(2, rng, 32).convert("L").save(paths["gray"])

    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    rotated.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    paths["exif"] = folder / "d_rotated.jpg"
    rotated.save(paths["exif"], exif=exif, quality=95)

    paths["corrupt"] = folder / "e_corrupt.jpg"
    good = folder / "a_photo.jpg"
    paths["corrupt"].write_bytes(good.read_bytes()[:200])  # a JPEG cut off after its header

    (folder / "notes.txt").write_text("not an image, not an image extension: skipped in folders\n")
    return paths
