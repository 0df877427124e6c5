"""A small real-photo dataset that needs no download: crops of the texture photos scikit-image ships.

Three classes (brick, grass, gravel); each split takes its crops from its own region of the photo, so no
pixel is shared between train, val and test.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("brick", "grass", "gravel")
# (split, rows of the 512x512 photo the split crops from, images per class)
_REGIONS = (("train", (0, 300), 16), ("val", (300, 406), 6), ("test", (406, 512), 6))


def make_demo_dataset(root: str | Path, seed: int = 0) -> Path:
    """Write ROOT/{train,val,test}/{brick,grass,gravel}/*.png (84 images) and return ROOT."""
    from skimage import data as skdata

    root = Path(root)
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        photo = getattr(skdata, cls)()  # greyscale uint8 photo, 512x512
        for split, (top, bottom), count in _REGIONS:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                size = int(rng.integers(64, min(160, bottom - top) + 1))
                y = int(rng.integers(top, bottom - size + 1))
                x = int(rng.integers(0, photo.shape[1] - size + 1))
                Image.fromarray(photo[y:y + size, x:x + size]).save(folder / f"{cls}_{k:02d}.png")
    return root
