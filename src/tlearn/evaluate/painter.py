"""Who draws the report's figures: this process, or a second one started before the training.

Importing matplotlib takes ~0.5 s and drawing a report's figures another ~0.5 s: two thirds of a re-train on cached
features. `tlearn train` starts a painter process first thing; it imports matplotlib on the other core while the
head is fitted, then draws each figure as it is asked to while this process writes the gallery, the page and the
model folder. Jobs and answers are JSON lines on the child's stdin and stdout (figure name, arguments, output
path), never pickles. Without a started painter, or if the child is gone, the figures are drawn here.

The child also imports scikit-learn's model_selection when told to (`prepare_folds`: a train with features to
extract, so folds to make; ~1.1 s, all of it holding the GIL) and answers the train's one request for
cross-validation folds (`folds`): in this process that import slows everything running beside it on a first train
(the engine's export, the decoding threads), on its own core it costs nothing.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FIGURES = ("training_curves", "confusion_matrices", "per_class_bars", "reliability", "coverage")


class FigureError(RuntimeError):
    """A figure could not be drawn (a bug: its traceback from the painter process is the message)."""


class Painter:
    """Draws figures by name (functions of tlearn.evaluate.plots); `finish` waits for every one asked so far."""

    def __init__(self, child: subprocess.Popen | None = None):
        self._child = child
        self._asked: list[tuple[str, list]] = []

    def draw(self, figure: str, *args) -> None:
        if figure not in FIGURES:
            raise ValueError(f"unknown figure {figure!r}")
        args = [str(a) if isinstance(a, Path) else a for a in args]
        self._asked.append((figure, args))
        if self._child is not None:
            try:
                self._child.stdin.write(json.dumps({"figure": figure, "args": args}, default=_plain) + "\n")
                self._child.stdin.flush()
            except (BrokenPipeError, OSError):
                self._child = None  # gone: finish draws what it did not confirm

    def prepare_folds(self) -> bool:
        """Have the child import scikit-learn now, for a `folds` request to come; False without a child."""
        if self._child is None:
            return False
        try:
            self._child.stdin.write(json.dumps({"prepare": "folds"}) + "\n")
            self._child.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            self._child = None
            return False

    def folds(self, labels: list[int], groups: list[int], k: int, seed: int) -> list[int] | None:
        """StratifiedGroupKFold(k, shuffle, seed)'s fold of each row, computed in the painter process; None when
        there is no child, figures are pending, or the child fails (the caller then computes them itself)."""
        if self._child is None or self._asked:
            return None
        try:
            self._child.stdin.write(json.dumps({"folds": {"labels": labels, "groups": groups, "k": k,
                                                          "seed": seed}}) + "\n")
            self._child.stdin.flush()
            answer = _answer(self._child.stdout.readline())
        except (BrokenPipeError, OSError):
            answer = None
        fold = None if answer is None else answer.get("fold")
        if answer is None:
            self._child = None
        if not isinstance(fold, list) or len(fold) != len(labels):
            return None
        return fold

    def finish(self) -> None:
        """Return once every figure asked for is on disk; raise FigureError if one failed."""
        asked, self._asked = self._asked, []
        done = 0
        if self._child is not None:
            for _ in asked:
                answer = _answer(self._child.stdout.readline())
                if answer is None:
                    self._child = None  # died (killed?) or talking nonsense: the rest is drawn here
                    break
                if answer.get("errno"):  # the disk refused the file: the same OSError as if it were drawn here
                    raise OSError(answer["errno"], answer["strerror"], answer["filename"])
                if answer.get("error"):
                    raise FigureError(f"drawing {asked[done][0]} failed in the painter process:\n{answer['error']}")
                done += 1
        for figure, args in asked[done:]:
            _draw(figure, args)

    def close(self) -> None:
        """Let the child go (it exits when its stdin closes); this process does not wait for its teardown."""
        if self._child is not None:
            self._child.stdin.close()
            self._child = None


_started: Painter | None = None


def start() -> None:
    """Start the painter process now (idempotent), for the next report of this process to use."""
    global _started
    if _started is None:
        # in a process group of its own: Ctrl-C at the terminal interrupts the parent (which says what was kept),
        # not the painter, which ends when its stdin closes
        child = subprocess.Popen([sys.executable, "-m", "tlearn.evaluate.painter"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, encoding="utf-8", bufsize=1, process_group=0)
        _started = Painter(child)


def folds(labels: list[int], groups: list[int], k: int, seed: int) -> list[int] | None:
    """The started painter's folds (Painter.folds), or None when none is started."""
    return None if _started is None else _started.folds(labels, groups, k, seed)


def prepare_folds() -> bool:
    """The started painter's prepare_folds; False when none is started (the caller imports scikit-learn)."""
    return _started is not None and _started.prepare_folds()


def take() -> Painter:
    """The started painter (handed over once), or one that draws in this process."""
    global _started
    painter, _started = _started, None
    return painter or Painter()


def _answer(line: str) -> dict | None:
    """The painter's answer on `line`, or None: end of file (it died), or a line that is not one of its answers."""
    try:
        answer = json.loads(line)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _draw(figure: str, args: list) -> None:
    from tlearn.evaluate import plots

    getattr(plots, figure)(*args)


def _folds(labels: list[int], groups: list[int], k: int, seed: int) -> list[int]:
    import numpy as np

    from tlearn.train.choices import stratified_group_folds

    return stratified_group_folds(np.asarray(labels, np.int64), np.asarray(groups, np.int64), k, seed).tolist()


def _plain(value):
    import numpy as np  # only here: the CLI imports this module, and `tlearn --help` must start fast

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _serve() -> None:
    """The painter process: import the plotting code, then draw each job read from stdin, answering in order."""
    import traceback

    from tlearn.evaluate import plots  # noqa: F401  (the slow imports, done while the parent trains)

    for line in sys.stdin:
        job = json.loads(line)
        if "prepare" in job:  # folds will be asked for: import scikit-learn now, no answer
            try:
                import sklearn.model_selection  # noqa: F401
            except ImportError:  # the base install: the folds request gets an error, the parent computes them
                pass
            continue
        try:
            if "folds" in job:
                answer = {"fold": _folds(**job["folds"])}
            else:
                _draw(job["figure"], job["args"])
                answer = {"ok": True}
        except OSError as exc:  # a full or read-only disk: the parent reports it as its own
            answer = {"errno": exc.errno, "strerror": exc.strerror, "filename": str(exc.filename),
                      "error": traceback.format_exc()}
        except Exception:  # reported to the parent, which raises it there
            answer = {"error": traceback.format_exc()}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
