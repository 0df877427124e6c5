"""Engines over views of the pixels they are given: the mirror (left-right flip), and the mean of the image's and
its mirror's outputs (test-time augmentation: two forward passes per image). numpy only."""
from __future__ import annotations

from typing import Callable

import numpy as np


def mirror(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (n, 3, H, W) flipped left to right (the centre crop is symmetric: the mirror image's crop)."""
    return np.ascontiguousarray(pixels[..., ::-1])


class Mirrored:
    """An engine run on the mirror of the pixels it is given."""

    def __init__(self, engine: Callable[[np.ndarray], np.ndarray]):
        self.engine = engine
        self.name, self.precision = getattr(engine, "name", "?"), getattr(engine, "precision", "fp32")
        self.decode_processes = getattr(engine, "decode_processes", False)  # fed as the engine it wraps

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.engine(mirror(pixels))


class MeanOfViews:
    """An engine giving the mean of the features of the pixels and of their mirror: two forward passes."""

    def __init__(self, engine: Callable[[np.ndarray], np.ndarray]):
        self.engine = engine
        self.name, self.precision = getattr(engine, "name", "?"), getattr(engine, "precision", "fp32")
        self.decode_processes = getattr(engine, "decode_processes", False)  # fed as the engine it wraps
        if hasattr(engine, "run_whole"):  # each view whole on one stream, for callers in threads (run_concurrent)
            self.run_whole = lambda pixels: (engine.run_whole(pixels) + engine.run_whole(mirror(pixels))) / 2

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return (self.engine(pixels) + self.engine(mirror(pixels))) / 2
