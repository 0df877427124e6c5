"""Writing results safely: CSV cells a spreadsheet will not run, names a terminal will not obey, files written
whole or not at all, and never over a file tlearn did not write.

File names are text that anyone could have chosen. The rules, the same everywhere:
- CSV: control characters are escaped (\\x1b), a cell that begins with = + - @ tab or CR gets a leading
  single quote (OWASP's rule against formula injection); the file is UTF-8 and a name that is not valid UTF-8
  keeps its original bytes (errors="surrogateescape"), so the path in the CSV opens the same file.
- JSON: json's own escapes (ensure_ascii), so a non-UTF-8 name comes back intact through os.fsencode.
- Terminal: control characters and undecodable bytes are shown as escapes (\\x1b, \\xff), and Rich markup in a
  name is printed as the text it is.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

from rich.markup import escape

from tlearn.errors import TlearnError
from tlearn.files import temporary_beside

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
CSV_COLUMNS = ("path", "label", "score")  # the first columns of every CSV of predictions


class OutputRefused(TlearnError):
    """The output file cannot be written where it was asked; the message says why and what to do."""


def csv_cell(text: str) -> str:
    """`text` made safe for a CSV cell: control characters escaped, a formula start neutralised."""
    safe = _escape_controls(text)
    return "'" + safe if text.startswith(FORMULA_STARTS) else safe


def plain_text(text: str | os.PathLike) -> str:
    """`text` with control characters and undecodable bytes shown as escapes (\\x1b, \\xff): printable anywhere."""
    return "".join(_escape_char(c) if _is_control(c) or _is_surrogate(c) else c for c in os.fspath(text))


def terminal_text(text: str | os.PathLike) -> str:
    """`text` made safe to print with Rich: control characters and undecodable bytes escaped, markup inert."""
    return escape(plain_text(text))


def json_text(document: object) -> str:
    """The JSON text of `document`; any name survives (ASCII escapes, surrogates included)."""
    return json.dumps(document, indent=1, ensure_ascii=True)


def csv_writer(handle: IO[str]) -> csv.writer:
    return csv.writer(handle, lineterminator="\n")


def write_predictions(rows: Iterable, sink: IO[str], fmt: str = "csv", k: int = 1, with_top_label: bool = False,
                      unreadable: list | None = None, advance: Callable[[], object] = lambda: None) -> int:
    """Write each Prediction of `rows` to `sink`: CSV one row as it arrives (path, label, score, [top_label],
    label_2, score_2, ...), or JSON at the end with the unreadable files. The Unreadable rows are appended to
    `unreadable`; return how many predictions were written."""
    from tlearn.predict import Unreadable

    unreadable = [] if unreadable is None else unreadable
    writer = csv_writer(sink) if fmt == "csv" else None
    if writer:
        writer.writerow(list(CSV_COLUMNS) + (["top_label"] if with_top_label else []) +
                        [f"{c}_{i}" for i in range(2, k + 1) for c in ("label", "score")])
    predictions, written = [], 0
    for row in rows:
        advance()
        if isinstance(row, Unreadable):
            unreadable.append(row)
            continue
        written += 1
        if writer:
            writer.writerow([csv_cell(row.source), csv_cell(row.label), f"{row.score:.6f}"] +
                            ([csv_cell(row.top_label)] if with_top_label else []) +
                            [v for label, score in row.top[1:] for v in (csv_cell(label), f"{score:.6f}")])
            sink.flush()
        else:
            predictions.append({"path": row.source, "label": row.label, "score": row.score,
                                "top": [{"label": label, "score": score} for label, score in row.top]})
    if writer is None:
        sink.write(json_text({"predictions": predictions,
                              "unreadable": [{"path": u.source, "reason": u.reason} for u in unreadable]}) + "\n")
    return written


def check_output_path(path: Path, force: bool = False) -> None:
    """Refuse, with one clear line, an output that would land in a missing folder, on a folder, or over a file
    that is not a previous result (an image, or anything else tlearn did not write) unless `force`."""
    parent = path.parent
    if not parent.is_dir():
        raise OutputRefused(f"cannot write {terminal_text(path)}: the folder {terminal_text(parent)} does not exist")
    if path.is_dir():
        raise OutputRefused(f"cannot write {terminal_text(path)}: it is a folder; give a file name")
    if os.path.lexists(path) and not force and not is_previous_result(path):
        raise OutputRefused(f"{terminal_text(path)} exists and is not a previous tlearn result (a .csv or .json "
                            "that tlearn predict wrote): refusing to overwrite it; choose another name, or add --force")
    if not os.access(parent, os.W_OK):
        raise OutputRefused(f"cannot write {terminal_text(path)}: the folder {terminal_text(parent)} is not "
                            "writable")


def is_previous_result(path: Path) -> bool:
    """Whether `path` is an empty file or one that `tlearn predict --output` wrote (told by how it begins)."""
    start = _result_start(path.suffix.lower())
    if start is None or not path.is_file():
        return False
    try:
        with open(path, "rb") as existing:
            head = existing.read(max(len(start), len(RANK_CSV_START)))
    except OSError:
        return False
    if head == b"" or head.startswith(start):
        return True
    return path.suffix.lower() == ".csv" and head.startswith(RANK_CSV_START)  # predict --rank's table


RANK_CSV_START = b"rank,path,label,score"


def _result_start(suffix: str) -> bytes | None:
    """How write_predictions begins a file of that suffix (its CSV header; its JSON document up to the list of
    predictions), so that a previous result may be replaced without --force and nothing else is."""
    if suffix == ".csv":
        return ",".join(CSV_COLUMNS).encode()
    if suffix == ".json":
        return json_text({"predictions": []}).split("[", 1)[0].encode() + b"["
    return None


@contextmanager
def atomic_text_file(path: Path, option: str | None = None) -> Iterator[IO[str]]:
    """A text file (UTF-8, names' original bytes kept) that appears at `path` only once it is complete:
    written to a temporary file beside it (0644), synced, then renamed over it."""
    with temporary_beside(path, option) as tmp:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as text:
            yield text
            text.flush()
            os.fsync(text.fileno())
        os.replace(tmp, path)


@contextmanager
def stdout_text() -> Iterator[IO[str]]:
    """Standard output as UTF-8 text that writes a non-UTF-8 name's original bytes instead of failing."""
    stream = sys.stdout
    if not hasattr(stream, "buffer"):
        yield stream
        return
    stream.flush()
    text = io.TextIOWrapper(stream.buffer, encoding="utf-8", errors="surrogateescape", newline="",
                            write_through=True)
    try:
        yield text
    finally:
        text.flush()
        text.detach()  # standard output stays open


BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")  # reorder text


def _is_control(char: str) -> bool:
    return unicodedata.category(char) == "Cc" or char in BIDI_CONTROLS


def _is_surrogate(char: str) -> bool:
    return 0xDC80 <= ord(char) <= 0xDCFF


def _escape_char(char: str) -> str:
    code = ord(char)
    if _is_surrogate(char):
        return f"\\x{code - 0xDC00:02x}"  # the byte that was not UTF-8
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _escape_controls(text: str) -> str:
    return "".join(_escape_char(c) if _is_control(c) else c for c in text)
