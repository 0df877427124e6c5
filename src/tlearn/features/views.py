"""Views of an image for the frozen backbone: the image itself and its mirror (left-right flip of its pixels).

The mirror's features come from the same engine, on the same pipeline's pixels flipped, and are cached like any
features, under a key of their own derived from the image features' key. The head can learn from both views
(training rows), and a model can predict on the mean of both views' features (test-time augmentation: two forward
passes per image). Nothing here imports torch.
"""
from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from tlearn.backbones import Preprocessing
from tlearn.engines.views import Mirrored
from tlearn.features.cache import FeatureCache
from tlearn.features.extract import Features, extract_features


def view_key(key: str, view: str) -> str:
    """Feature-cache key of `view` ("image" or "mirror") of the images whose own features have key `key`."""
    if view == "image":
        return key
    return hashlib.sha256(f"{key}:{view}".encode()).hexdigest()[:32]


@dataclass
class ViewFeatures:
    """Features of a list of files in each view asked, on the same rows (files that decoded in every view)."""

    views: dict[str, np.ndarray]  # view -> (len(kept), dim) float32
    kept: np.ndarray
    failures: list[tuple[Path, str]]
    computed: int  # vectors extracted now, over all views
    from_cache: int
    seconds: float

    def mean(self) -> np.ndarray:
        """The mean of the views' features, row by row (what a model with test-time augmentation sees)."""
        return np.mean(list(self.views.values()), axis=0).astype(np.float32)


def extract_views(paths: Sequence[Path], cache: FeatureCache, engine: Callable[[], Callable],
                  preprocessing: Preprocessing, views: Sequence[str] = ("image",), description: str = "features",
                  **options) -> ViewFeatures:
    """Features of `paths` in each of `views`, each from its own part of the cache (keyed by view_key); `engine`
    opens the engine, only when something is left to extract. `options` go to extract_features."""
    found: dict[str, Features] = {}
    for view in views:
        own = view == "image"
        with nullcontext(cache) if own else FeatureCache(view_key(cache.key, view), cache.directory) as part:
            found[view] = extract_features(paths, part, engine if own else (lambda: Mirrored(engine())),
                                           preprocessing, description=description if own else f"{description} ({view})",
                                           **options)
    kept = found[views[0]].kept
    for features in found.values():
        kept = np.intersect1d(kept, features.kept)
    rows = {view: f.vectors[np.searchsorted(f.kept, kept)] for view, f in found.items()}
    computed = sum(f.computed for f in found.values())
    return ViewFeatures(rows, kept, found[views[0]].failures, computed,
                        sum(len(f.kept) for f in found.values()) - computed, sum(f.seconds for f in found.values()))
