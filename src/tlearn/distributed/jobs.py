"""The prediction job behind `tlearn predict ... --output OUT.parquet [--ray local|auto|ADDRESS] [--resume]`.

Without Ray, the single-machine pipeline (Predictor.iter_files) writes the same Parquet as the Ray job does: one
sink and one row format, whichever runs the predictions.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tlearn.sinks import PART_ROWS, ParquetSink, PredictionColumns
from tlearn.sources import expand_sources, is_uri


def predict_to_parquet(model_dir: str | os.PathLike, sources: Sequence[str | os.PathLike], output: str | os.PathLike,
                       *, ray: bool = False, address: str | None = None, resume: bool = False, top_k: int = 1,
                       min_confidence: float | None = None, probabilities: bool = False, engine: str = "auto",
                       precision: str | None = None, batch_size: int = 32, part_rows: int = PART_ROWS,
                       progress: bool = False) -> dict:
    """Predict every image `sources` name (see tlearn.sources) into the Parquet folder `output`; returns its
    manifest. With `resume`, paths already in `output` are skipped; `ray` runs the job on a Ray cluster (`address`:
    None or "local" for a cluster started here, "auto", or an address)."""
    from tlearn.errors import require
    from tlearn.predict import Predictor, Unreadable

    require("pyarrow", "parquet", "Parquet output")
    if ray:
        from tlearn.distributed.cluster import require_ray

        require_ray()  # before anything is written
    predictor = Predictor.load(model_dir, engine=engine, precision=precision, batch_size=batch_size)
    card = predictor.card
    columns = PredictionColumns(card.model_sha256, card.tlearn_version, tuple(card.classes),
                                max(1, min(top_k, len(card.classes))), probabilities)
    sink = ParquetSink(output, columns, resume=resume, part_rows=part_rows)
    found = expand_sources(sources).without(sink.done)
    sink.write_rows(Unreadable(m.source, m.reason) for m in found.missing)
    if ray:
        from tlearn.distributed.prediction import predict_on_ray

        del predictor  # the actors load their own; the driver only writes
        facts = predict_on_ray(Path(model_dir), found.files, sink, address=address,
                               engine=engine, precision=precision, batch_size=batch_size,
                               min_confidence=min_confidence, progress=progress)
    else:
        start, first = time.perf_counter(), []
        rows = _predict_here(predictor, found.files, columns.top_k, min_confidence)
        sink.write_rows(_noting_first(rows, first))
        facts = job_facts("local", start, first[0] if first else None, len(found.files), os.cpu_count() or 1, 1)
    return sink.finish(engine=card.engine, model=card.name, **facts)


def _predict_here(predictor, files: Sequence[str], top_k: int, min_confidence: float | None) -> Iterator:
    """Local files through the streaming pipeline; object-store URIs read with pyarrow, a batch at a time."""
    from tlearn.predict import Unreadable

    local = [Path(f) for f in files if not is_uri(f)]
    yield from predictor.iter_files(local, top_k, min_confidence)
    remote = [f for f in files if is_uri(f)]
    for start in range(0, len(remote), predictor.batch_size):
        contents = {uri: _read_uri(uri) for uri in remote[start:start + predictor.batch_size]}
        readable = [uri for uri, content in contents.items() if isinstance(content, bytes)]
        rows = dict(zip(readable, predictor.predict([contents[uri] for uri in readable], top_k, min_confidence)))
        yield from (dataclasses.replace(rows[uri], source=uri) if uri in rows else Unreadable(uri, contents[uri])
                    for uri in contents)


def _read_uri(uri: str) -> bytes | str:
    """The object's bytes, or why it cannot be read."""
    from pyarrow import fs

    try:
        filesystem, path = fs.FileSystem.from_uri(uri)
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except (OSError, ValueError) as exc:
        return f"cannot read it ({exc})"


def job_facts(mode: str, start: float, first: float | None, images: int, cores: int, nodes: int, **more) -> dict:
    """What a job's manifest says about its speed: whole seconds and images/s, and the start-up (until the first
    rows came back: cluster, actors, engine)."""
    seconds = time.perf_counter() - start
    return {"mode": mode, **more, "cores": cores, "nodes": nodes, "images": images, "seconds": round(seconds, 3),
            "startup_seconds": round((first or time.perf_counter()) - start, 3),
            "images_per_second": round(images / seconds, 2) if seconds else None}


def _noting_first(rows: Iterable, when: list[float]) -> Iterator:
    for row in rows:
        if not when:
            when.append(time.perf_counter())
        yield row
