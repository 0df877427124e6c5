"""What the fine-tuning loop reads: (input, label) datasets of images or of cached trunk activations.

Scored inputs (inner split, val, test) are always the pixels prediction sees: Preprocessing.to_pixels after the
draft decoding of tlearn.engines.stream_pixels (or the frozen trunk's activations of exactly those pixels).
Augmentation is a training-only transform in front of that pipeline.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from tlearn.backbones import Preprocessing
from tlearn.data.decoded import DecodedImages


@dataclass
class Decoded:
    """Which of a list of files decoded (positions in the list), and why the others did not."""

    kept: np.ndarray
    failures: list[tuple[Path, str]] = field(default_factory=list)


class EvalPixels(TorchDataset):
    """uint8 eval pixels (n, 3, H, W) of decoded files, normalised as the engines do, with their labels."""

    def __init__(self, pixels: torch.Tensor, labels: np.ndarray, preprocessing: Preprocessing):
        self.pixels, self.labels, self.preprocessing = pixels, np.asarray(labels), preprocessing

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int):
        return self.preprocessing.normalise(self.pixels[i][None])[0], int(self.labels[i])


class AugmentedImages(TorchDataset):
    """Decoded images, randomly transformed anew each time an item is read (the full-image loop's train set)."""

    def __init__(self, images: DecodedImages, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images.pixels[i]), int(self.images.labels[i])


class CachedViews(TorchDataset):
    """Trunk activations (n, views, C, h, w): each read draws one of the image's views, as a random crop would."""

    def __init__(self, activations: torch.Tensor, labels: np.ndarray):
        self.activations, self.labels = activations, np.asarray(labels)

    def __len__(self) -> int:
        return len(self.activations)

    def __getitem__(self, i: int):
        view = int(torch.randint(self.activations.shape[1], ()))  # torch's generator: seeded by the recipe
        return self.activations[i, view].float(), int(self.labels[i])


def eval_pixels(paths: Sequence[Path], preprocessing: Preprocessing, batch_size: int = 32,
                workers: int | None = None) -> tuple[torch.Tensor, Decoded]:
    """uint8 (n, 3, H, W) of the files that decoded, through the one pixel pipeline, and which those were."""
    from tlearn.engines import stream_pixels

    chunks, kept, failures = [], [], []
    for batch in stream_pixels(list(paths), preprocessing, batch_size, workers):
        failures.extend((Path(paths[i]), reason) for i, reason in batch.errors)
        kept.extend(batch.indices)
        chunks.append(torch.from_numpy(batch.pixels))
    size = preprocessing.input_size
    pixels = torch.cat(chunks) if chunks else torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return pixels, Decoded(np.asarray(kept, np.int64), failures)
