"""Frozen-backbone feature extraction: pooled features of each image, computed once and cached on disk."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tlearn.backbones import Preprocessing
from tlearn.data.decode import content_hash
from tlearn.features.cache import FeatureCache

FEATURE_FORMAT = 2  # bump when the way features are computed changes, so old cache entries are not reused


def feature_key(architecture: str, weights_sha256: str, preprocessing: Preprocessing, precision: str = "fp32") -> str:
    """Cache key of a backbone configuration: architecture, exact weights, preprocessing and forward precision.

    fp32 engines agree with torch to 1e-3 (checked when opened), so they share one key; bf16 and int8 features
    differ and get their own.
    """
    parts = [FEATURE_FORMAT, architecture, weights_sha256, preprocessing.to_dict()]
    blob = json.dumps(parts + ([precision] if precision != "fp32" else []), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class Features:
    """Features of a list of files: rows of `vectors` belong to `paths[i]` for i in `kept`."""

    vectors: np.ndarray  # (len(kept), dim) float32
    kept: np.ndarray  # positions (in the input list) of files that decoded
    failures: list[tuple[Path, str]] = field(default_factory=list)
    computed: int = 0  # how many were extracted now (the rest came from the cache)
    seconds: float = 0.0  # time spent extracting


def extract_features(paths: Sequence[Path], cache: FeatureCache, engine: Callable[[], Callable],
                     preprocessing: Preprocessing, *, batch_size: int = 32, workers: int | None = None,
                     progress: bool = True, description: str = "features",
                     hashes: Sequence[str | None] | None = None) -> Features:
    """Pooled features for `paths`, from the cache where present; decode failures are reported, not raised, and
    remembered by content like features, so a re-run decodes nothing it decoded before.

    `engine` opens the inference engine that runs the backbone (see tlearn.features.backbone); it is called only
    when something is left to extract. `hashes` are the files' content hashes when the caller has them already
    (None: unreadable). Nothing here imports torch.
    """
    hashes = [content_hash(p) for p in paths] if hashes is None else list(hashes)
    known = [h for h in hashes if h is not None]
    cached, failed = cache.get_many(known), cache.failures(known)
    failures = [(Path(paths[i]), "cannot read file" if h is None else failed[h])
                for i, h in enumerate(hashes) if h is None or h in failed]
    todo = [i for i, h in enumerate(hashes) if h is not None and h not in cached and h not in failed]
    computed, start, seconds = 0, time.perf_counter(), 0.0
    if todo:
        run = engine()  # may build, export and compile the engine: outside the timed extraction
        start = time.perf_counter()
        from tlearn.engines import run_batches, stream_pixels

        with _progress(progress) as bar:
            task = bar.add_task(f"extracting {description}", total=len(todo))
            batches = stream_pixels([paths[i] for i in todo], preprocessing, batch_size, workers, engine=run)
            for batch, out in run_batches(run, batches):
                bad = [(hashes[todo[j]], reason) for j, reason in batch.errors]
                failures.extend((Path(paths[todo[j]]), reason) for j, reason in batch.errors)
                cache.put_failures(bad)
                if batch.indices:
                    fresh = [(hashes[todo[j]], out[k]) for k, j in enumerate(batch.indices)]
                    cache.put_many(fresh)
                    cached.update(fresh)
                    computed += len(fresh)
                bar.advance(task, len(batch.indices) + len(batch.errors))
        seconds = time.perf_counter() - start
    kept = np.array([i for i, h in enumerate(hashes) if h is not None and h in cached], dtype=np.int64)
    dim = next(iter(cached.values())).shape[0] if cached else 0
    vectors = np.stack([cached[hashes[i]] for i in kept]) if len(kept) else np.zeros((0, dim), np.float32)
    failures.sort(key=lambda item: str(item[0]))
    return Features(vectors, kept, failures, computed=computed, seconds=seconds)


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)
