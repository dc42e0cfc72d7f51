"""A Food-101-like folder of real-photo JPEGs: crops of scikit-learn's two sample photographs.

Food-101's images have a longest side of 512 px and are JPEGs of photographs; these are
random crops (aspect 3:4 to 4:3, at least 250 px tall) of ``china.jpg`` / ``flower.jpg``,
resized so the longest side is ``long_side``, saved at JPEG quality 90, spread over
``classes`` class folders (``root/<class>/<n>.jpg``, the imagefolder layout).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_photo_folder(root: Path, n: int, long_side: int = 512, classes: int = 8, seed: int = 0) -> list[tuple[str, int]]:
    """Write ``n`` JPEGs under ``root``; returns (path, class index) per image, in order."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        src = photos[k % len(photos)]
        aspect = float(rng.uniform(3 / 4, 4 / 3))
        h = int(rng.integers(250, src.shape[0] + 1))
        w = min(src.shape[1], int(round(h * aspect)))
        top = int(rng.integers(0, src.shape[0] - h + 1))
        left = int(rng.integers(0, src.shape[1] - w + 1))
        img = Image.fromarray(src[top:top + h, left:left + w])
        scale = long_side / max(h, w)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        label = k % classes
        path = root / f"class{label}" / f"{k:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
        out.append((str(path), label))
    return out
