"""Batch prediction on Ray Data: raw bytes read by Ray, decoded and run through the Predictor inside actors.

Each actor loads the model folder once (Predictor.load: its verified exported engine, no torch) and turns batches of
(path, bytes) into finished table rows; the driver only writes them (tlearn.sinks), pulling as fast as it writes,
so Ray holds back reads and decoding when the writer falls behind.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from tlearn.distributed.cluster import actor_pool, ray_cluster, read_images
from tlearn.distributed.jobs import job_facts
from tlearn.sinks import ParquetSink, PredictionColumns

if TYPE_CHECKING:
    import pyarrow as pa


class PredictionActor:
    """A Predictor in a Ray actor: bytes in, rows of `columns` out (a row with the reason for an unreadable file)."""

    def __init__(self, model_dir: str, engine: str, precision: str | None, batch_size: int, columns: dict,
                 min_confidence: float | None):
        from tlearn.predict import Predictor

        self.predictor = Predictor.load(model_dir, engine=engine, precision=precision, batch_size=batch_size)
        self.columns, self.min_confidence = PredictionColumns(**columns), min_confidence
        self.pool = ThreadPoolExecutor(self.predictor.workers, thread_name_prefix="tlearn-decode")

    def __call__(self, batch: dict) -> pa.Table:
        from tlearn.predict import Unreadable

        paths = [str(p) for p in batch["path"]]
        decoded = list(self.pool.map(self._pixels, batch["bytes"]))
        good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
        # concurrent: the batch runs whole on one engine stream while this actor's other calls decode or use the
        # other streams (see cluster.actor_pool)
        proba = self.predictor.probabilities(np.stack([decoded[i] for i in good]), concurrent=True) if good else []
        top_k, threshold = self.columns.top_k, self.min_confidence
        ranked = {i: self.predictor.rank(paths[i], p, top_k, threshold) for i, p in zip(good, proba)}
        return self.columns.table([ranked.get(i) or Unreadable(paths[i], decoded[i]) for i in range(len(paths))])

    def _pixels(self, content: bytes) -> np.ndarray | str:
        from tlearn.data.decode import DecodeError

        try:
            return self.predictor.to_pixels(content)
        except DecodeError as exc:
            return exc.reason


def predict_on_ray(model_dir: Path, files: Sequence[str], sink: ParquetSink, *, address: str | None = None,
                   engine: str = "auto", precision: str | None = None, batch_size: int = 32,
                   min_confidence: float | None = None, progress: bool = False) -> dict:
    """Predict `files` (local paths every node can read, or object-store URIs) on Ray and write them to `sink`.

    One actor per node (see cluster.actor_pool; the Predictor decodes in one thread per core and its engine runs on
    all of them). Returns facts for the manifest: seconds, images/s, start-up, cores, nodes, address."""
    start, first = time.perf_counter(), None
    if not files:  # a resumed job with nothing left: no cluster to start
        return job_facts("ray", start, None, 0, 0, 0, address=address or "local")
    with ray_cluster(address, progress) as cluster:
        ds = read_images(files)
        ds = ds.map_batches(PredictionActor, batch_size=batch_size, **actor_pool(cluster),
                            fn_constructor_kwargs={"model_dir": str(Path(model_dir).resolve()), "engine": engine,
                                                   "precision": precision, "batch_size": batch_size,
                                                   "columns": asdict(sink.columns), "min_confidence": min_confidence})
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            first = first or time.perf_counter()
            sink.write_table(table)
        return job_facts("ray", start, first, len(files), cluster.cores, cluster.nodes, address=cluster.address)
