"""Images decoded once into memory as resized uint8 tensors, so training epochs augment without decoding JPEGs.

Each image keeps its aspect ratio with its shorter side at the preprocessing's resize size (e.g. 256 for a
224 input), exactly as the eval transform resizes it; a centre crop of it is then the eval input.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torchvision.transforms import v2

from tlearn.data.loader import image_batches


@dataclass
class DecodedImages:
    """uint8 (3, H, W) tensors of the files that decoded, their labels, and the files that did not."""

    pixels: list[torch.Tensor]
    labels: np.ndarray
    failures: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pixels)


def decode_resized(paths: Sequence[Path], labels: np.ndarray, shorter_side: int, interpolation: str = "bicubic",
                   workers: int | None = None, progress: bool = True, description: str = "images") -> DecodedImages:
    """Decode `paths` once, shorter side resized to `shorter_side`; undecodable files are reported, not raised."""
    resize = v2.Compose([v2.Resize(shorter_side, interpolation=v2.InterpolationMode(interpolation), antialias=True),
                         v2.PILToTensor()])
    pixels, kept, failures = [], [], []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task(f"decoding {description}", total=len(paths))
        # one image per batch: the tensors differ in size, and each is kept as it is
        for batch in image_batches(paths, resize, batch_size=1, workers=workers):
            failures.extend((Path(paths[i]), reason) for i, reason in batch.errors)
            if batch.indices:
                pixels.append(batch.pixels[0].clone())
                kept.append(batch.indices[0])
            bar.advance(task, len(batch.indices) + len(batch.errors))
    return DecodedImages(pixels, np.asarray(labels)[kept], failures)
