"""Augmentation for fine-tuning, on the decoded uint8 tensors (torchvision.transforms.v2), at the backbone's size.

Train: random resized crop + horizontal flip (+ TrivialAugment or RandAugment), then the backbone's normalisation.
Eval: the centre crop of an image already resized to the preprocessing's resize size, i.e. the eval transform.
MixUp / CutMix act on whole batches and turn the labels into class probabilities.
"""
from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms import v2

from tlearn.backbones import Preprocessing

POLICIES = ("none", "flip", "trivial", "randaugment")
MIN_CROP_SCALE = 0.25  # fine-grained classes (flowers) lose their evidence in smaller crops


def _normalise(preprocessing: Preprocessing) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(preprocessing.mean), list(preprocessing.std))]


def train_transform(preprocessing: Preprocessing, policy: str = "trivial") -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (3, H, W) -> normalised float (3, size, size), randomly cropped, flipped and (per policy) distorted."""
    if policy not in POLICIES:
        raise ValueError(f"unknown augmentation {policy!r}; choose one of: {', '.join(POLICIES)}")
    size = preprocessing.input_size
    interpolation = v2.InterpolationMode(preprocessing.interpolation)
    if policy == "none":
        return eval_transform(preprocessing)
    steps = [v2.RandomResizedCrop(size, scale=(MIN_CROP_SCALE, 1.0), interpolation=interpolation, antialias=True),
             v2.RandomHorizontalFlip()]
    if policy == "trivial":
        steps.append(v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR))
    elif policy == "randaugment":
        steps.append(v2.RandAugment(interpolation=v2.InterpolationMode.BILINEAR))
    return v2.Compose(steps + _normalise(preprocessing))


def eval_transform(preprocessing: Preprocessing) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (3, H, W) with shorter side = preprocessing.resize_size() -> normalised centre crop."""
    return v2.Compose([v2.CenterCrop(preprocessing.input_size)] + _normalise(preprocessing))


def batch_mixer(n_classes: int, mixup: float = 0.0, cutmix: float = 0.0) -> Callable | None:
    """MixUp and/or CutMix (alpha > 0 switches each on; one of them per batch), or None when both are off."""
    mixers = []
    if mixup > 0:
        mixers.append(v2.MixUp(alpha=mixup, num_classes=n_classes))
    if cutmix > 0:
        mixers.append(v2.CutMix(alpha=cutmix, num_classes=n_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
