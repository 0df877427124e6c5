"""Batch prediction over files and folders with a trained classifier."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from tlearn.backbones import Preprocessing
from tlearn.bundle import Classifier
from tlearn.data.decode import is_image_path
from tlearn.engines import PixelsToOutputs, TorchEngine, stream_pixels


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (label, probability), best first

    @property
    def label(self) -> str:
        return self.top[0][0]

    @property
    def score(self) -> float:
        return self.top[0][1]


@dataclass
class Unreadable:
    path: str
    reason: str


def expand_paths(paths: Iterable[str | Path]) -> tuple[list[Path], list[Unreadable]]:
    """Files as given, folders searched recursively for images (sorted); missing paths are reported."""
    files, missing = [], []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and is_image_path(p)))
        elif path.is_file():
            files.append(path)
        else:
            missing.append(Unreadable(str(path), "no such file or folder"))
    return files, missing


def predict_files(model: Classifier, classes: list[str], preprocessing: Preprocessing, files: list[Path],
                  top_k: int = 1, batch_size: int = 32, workers: int | None = None,
                  engine: Callable[[np.ndarray], np.ndarray] | None = None) -> Iterator[Prediction | Unreadable]:
    """Yield one Prediction or Unreadable per file, in input order, as batches complete.

    `engine` runs `model.backbone` (see tlearn.engines.open_engine; default eager torch fp32); the linear head runs
    in torch. Decoding of the next batches overlaps the forward pass of this one.
    """
    k = max(1, min(top_k, len(classes)))
    engine = engine or TorchEngine(PixelsToOutputs(model.backbone, preprocessing))
    with torch.inference_mode():
        for batch in stream_pixels(files, preprocessing, batch_size, workers):
            rows: dict[int, Prediction | Unreadable] = {i: Unreadable(str(files[i]), r) for i, r in batch.errors}
            if batch.indices:
                proba = model.head(torch.from_numpy(engine(batch.pixels))).float().softmax(-1)
                scores, labels = proba.topk(k, dim=-1)
                for j, i in enumerate(batch.indices):
                    rows[i] = Prediction(str(files[i]), [(classes[c], float(s)) for c, s in
                                                         zip(labels[j].tolist(), scores[j].tolist())])
            yield from (rows[i] for i in sorted(rows))
