"""Feature extraction on Ray Data for `tlearn train --ray`: the backbone's exported engine in actors, rows into the
driver's feature cache, so the head is then fitted exactly as after a local extraction."""
from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from tlearn.backbones import Preprocessing
from tlearn.distributed.cluster import actor_pool, ray_cluster, read_images
from tlearn.engines import run_concurrent
from tlearn.errors import EngineError, InvalidParameter
from tlearn.features.cache import FeatureCache

if TYPE_CHECKING:
    import pyarrow as pa


@dataclass
class RayExtraction:
    """What extract_features_ray did: features computed (now in the cache), files that failed, time, cores."""

    computed: int = 0
    failures: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0
    cores: int = 0


def _rows_schema():
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("content", pa.string()), ("vector", pa.binary()), ("error", pa.string())])


class FeatureActor:
    """One per node: opens the exported, verified engine once (no torch), then bytes -> (hash, vector)."""

    def __init__(self, key: str, folder: str, preprocessing: dict, engine: str, precision: str, threads: int):
        from tlearn.engines import open_exported

        self.engine = open_exported(key, Path(folder), engine, precision, threads)
        if self.engine is None:
            raise EngineError(f"no verified {engine} engine for {key} in {folder}: open it once on the driver "
                              "(tlearn.engines.open_engine) before extracting on Ray")
        self.preprocessing = Preprocessing.from_dict(preprocessing)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="tlearn-decode")
        self.lock = threading.Lock()  # for an engine without streams: one call in it at a time (run_concurrent)

    def __call__(self, batch: dict) -> pa.Table:
        import pyarrow as pa

        decoded = list(self.pool.map(self._pixels, batch["bytes"], batch["path"]))
        good = [i for i, d in enumerate(decoded) if isinstance(d, np.ndarray)]
        if good:
            vectors = run_concurrent(self.engine, np.stack([decoded[i] for i in good]), self.lock)
        rows = {"path": list(batch["path"]), "content": [None] * len(decoded), "vector": [None] * len(decoded),
                "error": [d if isinstance(d, str) else None for d in decoded]}
        for i, content in enumerate(batch["bytes"]):
            rows["content"][i] = hashlib.sha256(content).hexdigest()  # the feature cache's content hash
        for row, i in enumerate(good):
            rows["vector"][i] = np.ascontiguousarray(vectors[row], np.float32).tobytes()
        return pa.table(rows, schema=_rows_schema())

    def _pixels(self, content: bytes, path: str) -> np.ndarray | str:
        """uint8 (3, H, W) as the local pipeline makes them, or the reason the file cannot be used."""
        from tlearn.data.decode import DecodeError, decode_bytes

        try:
            draft = self.preprocessing.draft_size()
            return self.preprocessing.to_pixels(decode_bytes(content, path, draft))
        except DecodeError as exc:
            return exc.reason
        except Exception as exc:  # a transform failing on a strange image must not end the job either
            return f"cannot preprocess image ({type(exc).__name__}: {exc})"


def extract_features_ray(paths: Sequence[Path], hashes: Sequence[str | None], key: str, engine_folder: Path,
                         preprocessing: Preprocessing, cache: FeatureCache, address: str | None = None, *,
                         engine: str = "auto", precision: str = "fp32", batch_size: int = 32,
                         export: Callable[[], object] | None = None,
                         progress: bool = False) -> RayExtraction:
    """Compute on Ray the features of the `paths` whose content hash is not in `cache` yet, and store them there.

    `key` is the backbone's engine key (tlearn.engines.state_key) and `engine_folder` the folder where the driver
    exported and verified it: open_engine(..., folder=engine_folder) must have run once, or `export` (e.g.
    FrozenBackbone.engine) is called to do so when something is left to extract. Actors open it with open_exported
    (no torch), decode the raw bytes Ray read, run it, and return (content hash, vector) or (content hash, reason)
    rows, which go into `cache` as a local extraction would put them. A file whose hash is None (unreadable when
    hashed) is left to the local extraction, which reports it. Afterwards `extract_features` finds every feature
    (or decode failure) cached and computes nothing."""
    start = time.perf_counter()
    known = [h for h in hashes if h is not None]
    done = {**cache.get_many(known), **cache.failures(known)}
    todo = list({h: str(p) for p, h in zip(paths, hashes) if h is not None and h not in done}.values())
    if engine == "torch":
        raise InvalidParameter("--ray runs the exported engines (onnxruntime, OpenVINO): use --engine auto, openvino "
                               "or onnx")
    if not todo:
        return RayExtraction()
    if export is not None:
        export()
    result = RayExtraction(computed=0)
    with ray_cluster(address, progress) as cluster:
        ds = read_images(todo)
        ds = ds.map_batches(FeatureActor, batch_size=batch_size, **actor_pool(cluster),
                            fn_constructor_kwargs={"key": key, "folder": str(engine_folder),
                                                   "preprocessing": preprocessing.to_dict(), "engine": engine,
                                                   "precision": precision, "threads": cluster.cores_per_node})
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            _store(table, cache, result)
        result.cores = cluster.cores
    result.seconds = time.perf_counter() - start
    return result


def _store(table, cache: FeatureCache, result: RayExtraction) -> None:
    rows = table.to_pydict()
    fresh = [(content, np.frombuffer(vector, np.float32)) for content, vector in zip(rows["content"], rows["vector"])
             if vector is not None]
    failed = [(content, error) for content, error in zip(rows["content"], rows["error"]) if error is not None]
    cache.put_many(fresh)
    cache.put_failures(failed)  # remembered by content, as a local extraction does: not decoded again
    result.computed += len(fresh)
    result.failures += [(Path(p), e) for p, e in zip(rows["path"], rows["error"]) if e is not None]
