"""Where prediction jobs write: a Parquet folder of whole part files, a manifest and a _SUCCESS marker.

OUT.parquet/ holds part-NNNNNN.parquet files, each written to a hidden temporary file and renamed into place, so a
job killed at any moment (kill -9 included) leaves only whole parts; `resume` reads the paths of those parts and the
job skips them: every path ends up exactly once. Readers (pyarrow, pandas, Spark, DuckDB) take the folder as one
table and ignore `_manifest.json`, `_SUCCESS` and dot-files.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from tlearn.errors import InvalidParameter
from tlearn.files import write_atomically

if TYPE_CHECKING:
    import pyarrow as pa

    from tlearn.predict import Prediction, Unreadable

PART = re.compile(r"^part-(\d{6})\.parquet$")
MANIFEST, SUCCESS = "_manifest.json", "_SUCCESS"
PART_ROWS = 1000  # rows per part file: what a kill -9 can cost to recompute, and the driver's buffer


@dataclass(frozen=True)
class PredictionColumns:
    """The columns of a prediction table, and how Prediction / Unreadable rows become them.

    path, label ("uncertain" below min_confidence), score, top_labels, top_scores (best first, top_k long),
    probabilities (every class in `classes` order; only when asked), error (the reason a file was unreadable; null
    otherwise), model_sha256, tlearn_version. The model and the settings are also in the schema's metadata."""

    model_sha256: str
    tlearn_version: str
    classes: tuple[str, ...]
    top_k: int = 1
    probabilities: bool = False

    def schema(self) -> pa.Schema:
        import pyarrow as pa

        fields = [("path", pa.string()), ("label", pa.string()), ("score", pa.float64()),
                  ("top_labels", pa.list_(pa.string())), ("top_scores", pa.list_(pa.float64()))]
        if self.probabilities:
            fields.append(("probabilities", pa.list_(pa.float64())))
        fields += [("error", pa.string()), ("model_sha256", pa.string()), ("tlearn_version", pa.string())]
        metadata = {"tlearn": json.dumps({"model_sha256": self.model_sha256, "classes": list(self.classes),
                                          "top_k": self.top_k, "probabilities": self.probabilities})}
        return pa.schema(fields, metadata=metadata)

    def table(self, rows: Sequence[Prediction | Unreadable]) -> pa.Table:
        """One table row per Prediction or Unreadable, in order."""
        import pyarrow as pa

        columns: dict[str, list] = {name: [] for name in self.schema().names}
        for row in rows:
            error = getattr(row, "reason", None)
            columns["path"].append(row.source)
            columns["label"].append(None if error is not None else row.label)
            columns["score"].append(None if error is not None else row.score)
            columns["top_labels"].append(None if error is not None else [label for label, _ in row.top])
            columns["top_scores"].append(None if error is not None else [score for _, score in row.top])
            if self.probabilities:
                columns["probabilities"].append(None if error is not None else list(row.probabilities))
            columns["error"].append(error)
        columns["model_sha256"] = [self.model_sha256] * len(columns["path"])
        columns["tlearn_version"] = [self.tlearn_version] * len(columns["path"])
        return pa.table(columns, schema=self.schema())


@dataclass
class Written:
    """What a Parquet folder holds: rows, error rows, and the paths written (what a resumed job skips)."""

    rows: int = 0
    errors: int = 0
    paths: frozenset[str] = frozenset()


class ParquetSink:
    """Appends prediction tables to OUT.parquet/ as whole part files; `finish` writes the manifest and _SUCCESS.

    A folder that already has parts is refused unless `resume` is set; with it, the parts must come from the same
    model and columns, and `done` holds their paths."""

    def __init__(self, directory: str | os.PathLike, columns: PredictionColumns, resume: bool = False,
                 part_rows: int = PART_ROWS):
        self.directory, self.columns, self.part_rows = Path(directory), columns, max(1, part_rows)
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob(".*.tmp"):  # a part a killed job was writing: never renamed
            leftover.unlink()
        parts = sorted(p for p in self.directory.iterdir() if PART.match(p.name))
        if parts and not resume:
            raise InvalidParameter(f"{self.directory} already holds predictions: pass --resume to go on with them, "
                                   "or choose another --output")
        self.previous = _read_parts(parts, columns)
        (self.directory / SUCCESS).unlink(missing_ok=True)
        self._next = 1 + max((int(PART.match(p.name).group(1)) for p in parts), default=-1)
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self.rows = self.errors = 0  # written by this run

    @property
    def done(self) -> frozenset[str]:
        return self.previous.paths

    def write_rows(self, rows: Iterable[Prediction | Unreadable]) -> None:
        batch: list = []
        for row in rows:
            batch.append(row)
            if len(batch) >= self.part_rows:
                self.write_table(self.columns.table(batch))
                batch = []
        if batch:
            self.write_table(self.columns.table(batch))

    def write_table(self, table: pa.Table) -> None:
        """Buffer `table` (the schema of `columns`); a part file is written each time part_rows are buffered."""
        self._buffer.append(table)
        self._buffered += table.num_rows
        self.rows += table.num_rows
        self.errors += table.num_rows - table.column("error").null_count
        if self._buffered >= self.part_rows:
            self._flush()

    def finish(self, **facts) -> dict:
        """Write the last part, then `_manifest.json` (counts, errors, `facts` such as images/s and cores used)
        and `_SUCCESS`; returns the manifest."""
        self._flush()
        manifest = {"rows": self.previous.rows + self.rows, "errors": self.previous.errors + self.errors,
                    "rows_this_run": self.rows, "errors_this_run": self.errors,
                    "rows_before_resume": self.previous.rows, "parts": self._next,
                    "model_sha256": self.columns.model_sha256, "tlearn_version": self.columns.tlearn_version,
                    "top_k": self.columns.top_k, "probabilities": self.columns.probabilities, **facts}
        write_atomically(self.directory / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))
        (self.directory / SUCCESS).touch()
        return manifest

    def _flush(self) -> None:
        if not self._buffer:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.concat_tables(self._buffer)
        self._buffer, self._buffered = [], 0
        write_atomically(self.directory / f"part-{self._next:06d}.parquet", lambda tmp: pq.write_table(table, tmp))
        self._next += 1


def _read_parts(parts: Sequence[Path], columns: PredictionColumns) -> Written:
    import pyarrow.parquet as pq

    expected = columns.schema()
    paths: set[str] = set()
    errors = 0
    for part in parts:
        schema = pq.read_schema(part)
        if schema.metadata != expected.metadata or schema.names != expected.names:
            raise InvalidParameter(f"{part} was written by another model or with other settings (top-k, "
                                   "probabilities): resume with the same ones, or choose another --output")
        table = pq.read_table(part, columns=["path", "error"])
        paths.update(table.column("path").to_pylist())
        errors += table.num_rows - table.column("error").null_count
    return Written(len(paths), errors, frozenset(paths))


def read_predictions(directory: str | os.PathLike) -> pa.Table:
    """Every part of a prediction folder as one table (the manifest and markers are left out)."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(directory))
