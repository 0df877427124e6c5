"""A trained model measured on a labelled dataset, through its Predictor (features from the cache when present)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from tlearn.data import find_dataset
from tlearn.errors import DatasetError
from tlearn.evaluate import classification_metrics
from tlearn.evaluate.metrics import ScoredSplit
from tlearn.features import FeatureCache
from tlearn.features.views import extract_views
from tlearn.predict import Predictor


def score_dataset(predictor: Predictor, data: str | Path, splits: Sequence[str], cache_dir: str | Path | None = None,
                  progress: bool = True) -> dict[str, ScoredSplit]:
    """Per-image labels and uncalibrated logits of `splits` of `data`, split as the model's training split it
    (same seed and fractions). With several splits asked, those the dataset lacks are left out."""
    bundle = predictor.bundle
    training = bundle.training
    dataset = find_dataset(data, training.get("seed", 0), training.get("val_fraction", 0.15),
                           training.get("test_fraction", 0.15), cache_dir=cache_dir)
    if dataset.classes != bundle.classes:
        raise DatasetError(f"{dataset.root} has classes {dataset.classes}, but the model was trained on "
                           f"{bundle.classes}")
    head, scored = bundle.head(), {}
    # each view's features are cached on their own (a model with tta sees their mean)
    views = ("image", "mirror") if bundle.tta else ("image",)
    with FeatureCache(bundle.backbone.feature_key, cache_dir) as cache:
        for split in splits:
            if split not in dataset.splits and len(splits) > 1:
                continue  # e.g. no test split: score what there is
            paths = dataset.paths(split)  # a split the dataset lacks is a DatasetError that names the ones it has
            features = extract_views(paths, cache, lambda: lambda pixels: predictor.view_features(pixels, "image"),
                                     bundle.preprocessing, views, description=split, batch_size=predictor.batch_size,
                                     workers=predictor.workers, progress=progress)
            scored[split] = ScoredSplit(split, [paths[i] for i in features.kept], dataset.labels(split)[features.kept],
                                        head.logits(features.mean()).astype(np.float64))
    return scored


def metrics_of(scored: ScoredSplit, classes: list[str], seed: int = 0) -> dict:
    return classification_metrics(scored.labels, scored.logits.argmax(1), classes, seed)
