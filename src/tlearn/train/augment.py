"""Training-only augmentation for fine-tuning, always in front of the one pixel pipeline (Preprocessing.to_pixels).

Two kinds:
- Fixed views (`ViewSpec`): a seeded set of crops and mirrors of each image, each made by to_pixels on a
  transformed PIL image, so they can be computed once and their frozen-trunk activations cached (train/trunk.py).
  View 0 is the image itself: exactly the pixels prediction sees.
- Random transforms on decoded uint8 tensors (torchvision.transforms.v2), drawn anew every epoch, for the full-image
  loop: random resized crop + horizontal flip (+ TrivialAugment or RandAugment), then the backbone's normalisation.
MixUp / CutMix act on whole batches (of pixels, or of trunk activations: manifold MixUp) and turn labels into
class probabilities.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from tlearn.backbones import Preprocessing

if TYPE_CHECKING:
    import torch
    from PIL import Image

POLICIES = ("none", "flip", "trivial", "randaugment")
CACHEABLE = ("none", "flip")  # policies whose views are fixed per image; the others draw new pixels every epoch
MIN_CROP_SCALE = 0.25  # fine-grained classes (flowers) lose their evidence in smaller crops
ASPECT_RATIOS = (3 / 4, 4 / 3)  # as torchvision's RandomResizedCrop


@dataclass(frozen=True)
class ViewSpec:
    """Which fixed views of each image training sees: the image, its mirror, then `count - 2` random resized crops
    (area fraction in [min_scale, 1], each mirrored with probability 1/2), drawn from a generator seeded by
    `seed` and the image's content hash: the same image always gets the same views, in any order or dataset."""

    count: int = 6
    min_scale: float = MIN_CROP_SCALE
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def boxes(self, width: int, height: int, image_key: str) -> list[tuple[tuple[int, int, int, int], bool]]:
        """(crop box, mirrored) of each view of a width x height image."""
        digest = hashlib.sha256(f"{self.seed}:{image_key}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        whole = (0, 0, width, height)
        views = [(whole, False), (whole, True)][:self.count]
        while len(views) < self.count:
            views.append((_random_box(rng, width, height, self.min_scale), bool(rng.random() < 0.5)))
        return views


def view_pixels(image: Image.Image, preprocessing: Preprocessing, spec: ViewSpec, image_key: str) -> np.ndarray:
    """uint8 (count, 3, size, size): each view of `image` through the one pixel pipeline (to_pixels)."""
    from PIL import ImageOps

    out = np.empty((spec.count, 3, preprocessing.input_size, preprocessing.input_size), np.uint8)
    for k, (box, mirrored) in enumerate(spec.boxes(*image.size, image_key)):
        view = image if box == (0, 0, *image.size) else image.crop(box)
        out[k] = preprocessing.to_pixels(ImageOps.mirror(view) if mirrored else view)
    return out


def _random_box(rng: np.random.Generator, width: int, height: int, min_scale: float) -> tuple[int, int, int, int]:
    """A crop box as torchvision's RandomResizedCrop.get_params draws it (10 tries, else the whole image)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(*np.log(ASPECT_RATIOS)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    return 0, 0, width, height


def train_transform(preprocessing: Preprocessing, policy: str = "trivial") -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (3, H, W) with shorter side resize_size() -> normalised float (3, size, size), randomly cropped,
    flipped and (per policy) distorted: the full-image loop's augmentation."""
    from torchvision.transforms import v2

    check_policy(policy)
    size = preprocessing.input_size
    interpolation = v2.InterpolationMode(preprocessing.interpolation)
    if policy == "none":
        steps = [v2.CenterCrop(size)]
    else:
        steps = [v2.RandomResizedCrop(size, scale=(MIN_CROP_SCALE, 1.0), interpolation=interpolation,
                                      antialias=True), v2.RandomHorizontalFlip()]
    if policy == "trivial":
        steps.append(v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR))
    elif policy == "randaugment":
        steps.append(v2.RandAugment(interpolation=v2.InterpolationMode.BILINEAR))
    return v2.Compose(steps + [v2.Lambda(lambda x: preprocessing.normalise(x[None])[0])])


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown augmentation {policy!r}; choose one of: {', '.join(POLICIES)}")


def batch_mixer(n_classes: int, mixup: float = 0.0, cutmix: float = 0.0) -> Callable | None:
    """MixUp and/or CutMix (alpha > 0 switches each on; one of them per batch), or None when both are off."""
    from torchvision.transforms import v2

    mixers = []
    if mixup > 0:
        mixers.append(v2.MixUp(alpha=mixup, num_classes=n_classes))
    if cutmix > 0:
        mixers.append(v2.CutMix(alpha=cutmix, num_classes=n_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
