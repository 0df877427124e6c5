"""Image sets far from ImageNet's photos, built from what installed packages ship (no download).

Frozen ImageNet features are weakest on images unlike ImageNet's; these sets measure what fine-tuning buys there.
- digits: scikit-learn's 1,797 handwritten digits (8x8 greyscale, 10 classes), upscaled to PNGs.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_digits_dataset(root: str | Path, size: int = 64, per_class: int | None = None, seed: int = 0) -> Path:
    """Write ROOT/<digit>/<n>.png (a flat layout: tlearn carves val and test) and return ROOT.

    Each 8x8 digit (16 grey levels) is scaled to 0-255 and enlarged to size x size, nearest neighbour (sharp
    blocks, as the data is). `per_class` keeps a seeded sample of that many per digit (a small set for tests).
    """
    from sklearn.datasets import load_digits  # ships its data in the wheel: no download

    digits = load_digits()
    chosen = np.arange(len(digits.target))
    if per_class is not None:
        rng = np.random.default_rng(seed)
        chosen = np.sort(np.concatenate([rng.choice(np.flatnonzero(digits.target == d), per_class, replace=False)
                                         for d in np.unique(digits.target)]))
    root = Path(root)
    for k in chosen:
        folder = root / str(digits.target[k])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[k] / 16 * 255).astype(np.uint8)  # as bench/README.md's earlier digits figures
        Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST).save(folder / f"{k:04d}.png")
    return root
