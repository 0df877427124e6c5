"""Batch prediction over files and folders with a trained classifier."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from scipy.special import softmax

from tlearn.backbones import Preprocessing
from tlearn.data.decode import is_image_path


UNCERTAIN = "uncertain"  # the label of a prediction whose confidence is below the threshold asked for


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (label, probability), best first
    abstained: bool = False  # confidence below the min_confidence asked for

    @property
    def label(self) -> str:
        return UNCERTAIN if self.abstained else self.top[0][0]

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


def predict_files(head: Callable[[np.ndarray], np.ndarray], classes: list[str], preprocessing: Preprocessing,
                  files: list[Path], engine: Callable[[np.ndarray], np.ndarray], top_k: int = 1,
                  batch_size: int = 32, workers: int | None = None,
                  min_confidence: float | None = None) -> Iterator[Prediction | Unreadable]:
    """Yield one Prediction or Unreadable per file, in input order, as batches complete.

    `engine` runs the backbone (see tlearn.engines.open_engine), `head` maps its pooled features to calibrated
    logits (numpy: Bundle.head). Decoding of the next batches overlaps the forward pass of this one. A
    prediction whose top probability is below `min_confidence` is marked abstained (label "uncertain").
    """
    if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be between 0 and 1, not {min_confidence}")
    from tlearn.engines import run_batches, stream_pixels

    k = max(1, min(top_k, len(classes)))
    for batch, features in run_batches(engine, stream_pixels(files, preprocessing, batch_size, workers)):
        rows: dict[int, Prediction | Unreadable] = {i: Unreadable(str(files[i]), r) for i, r in batch.errors}
        if batch.indices:
            proba = softmax(np.asarray(head(features), np.float64), axis=1)
            best = np.argsort(-proba, axis=1, kind="stable")[:, :k]
            for j, i in enumerate(batch.indices):
                top = [(classes[c], float(proba[j, c])) for c in best[j]]
                rows[i] = Prediction(str(files[i]), top, min_confidence is not None and top[0][1] < min_confidence)
        yield from (rows[i] for i in sorted(rows))
