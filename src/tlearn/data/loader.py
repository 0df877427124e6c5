"""Decoded, preprocessed image batches from a list of files, decoding in worker processes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from tlearn.data.decode import DecodeError, load_image
from tlearn.data.pipeline import default_workers


@dataclass
class Batch:
    indices: list[int]  # positions in the input list of the images in `pixels`
    pixels: torch.Tensor  # (n, 3, H, W), may be empty when every image of the batch failed
    errors: list[tuple[int, str]]  # (position, reason) of files that could not be decoded


class _ImageFiles(TorchDataset):
    def __init__(self, paths: Sequence[Path], transform: Callable):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(load_image(self.paths[i])), None
        except DecodeError as exc:
            return i, None, exc.reason
        except Exception as exc:  # a transform failing on a strange image must not end the run either
            return i, None, f"cannot preprocess image ({type(exc).__name__}: {exc})"


def _collate(items) -> Batch:
    good = [(i, x) for i, x, err in items if err is None]
    pixels = torch.stack([x for _, x in good]) if good else torch.empty(0)
    return Batch([i for i, _ in good], pixels, [(i, err) for i, _, err in items if err is not None])


MAX_PROCESSES = 4  # each worker process holds its own interpreter and prefetched batches


def image_batches(paths: Sequence[Path], transform: Callable, batch_size: int = 32,
                  workers: int | None = None) -> Iterator[Batch]:
    """Yield batches of preprocessed images in input order; files that fail to decode are reported, not raised."""
    workers = min(MAX_PROCESSES, default_workers()) if workers is None else workers
    if len(paths) <= batch_size:
        workers = 0  # starting worker processes costs more than decoding one batch
    loader = DataLoader(_ImageFiles(paths, transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, shuffle=False, persistent_workers=False,
                        prefetch_factor=4 if workers else None)
    yield from loader
