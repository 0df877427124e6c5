"""The studio's train jobs: `tlearn train` on a project, in a process of its own, one at a time per project.

The child writes its output to a log file (never a pipe the server might stop reading); the page follows the file.
Each job's state is a small JSON file, replaced whole at every change, so a reloaded page and a restarted studio
show the last state; a job the studio did not see finish (it was stopped or killed meanwhile) reads as interrupted.
The model folder itself is written by `tlearn train`, which writes it whole or not at all.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from tlearn.backbones.registry import BACKBONES
from tlearn.errors import InvalidParameter, check_choice, check_range
from tlearn.files import write_atomically
from tlearn.serve.limits import Rejection
from tlearn.studio.workspace import Workspace, check_name

State = Literal["running", "done", "failed", "cancelled", "interrupted"]
RECIPES = ("head", "finetune", "auto")
STOP_SECONDS = 10.0  # after SIGTERM, how long a child has to exit before it is killed
LOG_READ_BYTES = 1 << 18  # most log read per call: a page that catches up gets the rest on the next


@dataclass(frozen=True)
class TrainOptions:
    """The few train settings the page offers (the rest keep tlearn's defaults), checked before any process."""

    recipe: str = "head"
    backbone: str = "efficientnet_lite0"
    epochs: int = 10  # fine-tuning only

    def __post_init__(self) -> None:
        check_choice("recipe", self.recipe, RECIPES)
        check_choice("backbone", self.backbone, (*BACKBONES, "auto"))
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int):
            raise InvalidParameter(f"epochs must be a whole number, not {self.epochs!r:.40}")
        check_range("epochs", self.epochs, 1, 200)

    @classmethod
    def from_json(cls, body: dict) -> "TrainOptions":
        unknown = sorted(set(body) - set(cls.__dataclass_fields__))
        if unknown:
            raise InvalidParameter(f"unknown train option(s) {', '.join(map(repr, unknown))}: the options are "
                                   f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**body)

    def arguments(self) -> list[str]:
        return ["--recipe", self.recipe, "--backbone", self.backbone, "--epochs", str(self.epochs)]


@dataclass(frozen=True)
class TrainJob:
    """One train of a project, as the page shows it and the state file keeps it."""

    project: str
    state: State
    started: float  # Unix time
    options: dict
    pid: int | None = None
    ended: float | None = None
    returncode: int | None = None
    error: str | None = None
    test: dict | None = field(default=None)  # {"accuracy", "ci95": [low, high], "n"} from the model's metrics.json
    version: int | None = None  # the model version this train writes (.studio/models/PROJECT/VERSION)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "TrainJob":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in record.items() if k in known})


class TrainJobs:
    """Starts, follows, cancels and remembers the train jobs of a workspace's projects."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self._lock = threading.Lock()  # guards the three dicts below and each state file
        self._last: dict[str, TrainJob] = {}
        self._running: dict[str, subprocess.Popen] = {}
        self._watchers: dict[str, threading.Thread] = {}
        self._cancelled: set[str] = set()
        self._stopping = False

    @property
    def folder(self) -> Path:
        return self.workspace.inside(self.workspace.studio_dir / "jobs", ".studio/jobs")

    def state_file(self, project: str) -> Path:
        return self.folder / f"{check_name(project, 'project')}.json"

    def log_file(self, project: str) -> Path:
        return self.folder / f"{check_name(project, 'project')}.log"

    def last(self, project: str) -> TrainJob | None:
        """The project's running or last job, from memory or its state file (None: never trained here)."""
        with self._lock:
            if project not in self._last:
                job = self._read_state(project)
                if job is not None and job.state == "running" and project not in self._running:
                    job = replace(job, state="interrupted", ended=job.ended or time.time(),
                                  error="the studio stopped while this train ran: train again")
                    self._write_state(job)
                self._last[project] = job
            return self._last[project]

    def refuse_while_running(self, project: str, doing: str) -> None:
        """409 while a train of the project runs: its photos must not change under it."""
        job = self.last(project)
        if job is not None and job.state == "running":
            raise Rejection(409, "one-job", f"a train of {project!r} is running: {doing} once it has ended")

    def start(self, project: str, options: TrainOptions) -> TrainJob:
        """Start `tlearn train` on the project; 409 while one of its trains is running."""
        data = self.workspace.project_dir(project)
        self.last(project)
        with self._lock:
            if self._stopping:
                raise Rejection(503, "stopping", "the studio is stopping: start it again to train")
            if project in self._running:
                raise Rejection(409, "one-job", f"a train of {project!r} is already running: wait for it to end, "
                                                "or cancel it")
            self.folder.mkdir(parents=True, exist_ok=True)
            version, model = self.workspace.next_version(project)
            model.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "tlearn.cli", "train", str(data), "--out", str(model),
                       *options.arguments()]
            process = start_child(command, self.log_file(project), f".studio/jobs/{project}.log",
                                  self.workspace.root)
            job = TrainJob(project, "running", time.time(), asdict(options), pid=process.pid, version=version)
            self._running[project], self._last[project] = process, job
            self._cancelled.discard(project)
            self._write_state(job)
            watcher = threading.Thread(target=self._watch, args=(project, process), daemon=True,
                                       name=f"tlearn-studio-train-{process.pid}")
            self._watchers[project] = watcher
        watcher.start()
        return job

    def cancel(self, project: str) -> TrainJob:
        """Stop the project's running train (SIGTERM, then SIGKILL); 409 when none runs."""
        self.workspace.project_dir(project)
        with self._lock:
            process = self._running.get(project)
            if process is None:
                raise Rejection(409, "no-job", f"no train of {project!r} is running")
            self._cancelled.add(project)
            stop_process(process)
            return self._last[project]

    def stop_all(self) -> None:
        """At the studio's shutdown: stop every running train and record it as interrupted."""
        with self._lock:
            self._stopping = True
            running = list(self._running.values())
            watchers = list(self._watchers.values())
        for process in running:
            stop_process(process)
        for watcher in watchers:
            watcher.join(STOP_SECONDS + 5)

    def read_log(self, project: str, offset: int) -> tuple[list[tuple[int, str]], int]:
        """Complete lines of the project's log from byte `offset` on, each with the offset just past it; and
        the offset to read from next."""
        try:
            with open(self.log_file(project), "rb") as handle:
                handle.seek(offset)
                chunk = handle.read(LOG_READ_BYTES)
        except FileNotFoundError:
            return [], offset
        lines, position = [], offset
        for raw in chunk.splitlines(keepends=True):
            if not raw.endswith((b"\n", b"\r")):
                break  # a line still being written: sent whole on a later read
            position += len(raw)
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if text.strip():
                lines.append((position, text))
        return lines, position

    # ---- the watcher thread: one per running job ---------------------------------------------------------------
    def _watch(self, project: str, process: subprocess.Popen) -> None:
        code = process.wait()
        with self._lock:
            job = self._last[project]
            if self._stopping:
                finished = replace(job, state="interrupted", error="the studio stopped while this train ran: "
                                                                   "train again")
            elif project in self._cancelled:
                finished = replace(job, state="cancelled", error="cancelled")
            elif code == 0:
                model = self.workspace.models_dir(project) / str(job.version)
                finished = replace(job, state="done", test=test_metrics(model))
            else:
                finished = replace(job, state="failed", error=self._failure(project, code))
            finished = replace(finished, ended=time.time(), returncode=code)
            self._last[project] = finished
            self._write_state(finished)
            self._running.pop(project, None)
            self._watchers.pop(project, None)

    def _failure(self, project: str, code: int) -> str:
        """The child's own `error:` line when it printed one (a problem the user can fix), else its last line."""
        lines, _ = self.read_log(project, max(0, _size(self.log_file(project)) - LOG_READ_BYTES))
        texts = [text for _, text in lines]
        errors = [t for t in texts if t.startswith("error:")]
        if errors:
            return errors[-1].removeprefix("error:").strip()
        signal_name = f" (signal {signal.Signals(-code).name})" if code < 0 and -code in signal.valid_signals() else ""
        return f"tlearn train exited with code {code}{signal_name}" + (f": {texts[-1]}" if texts else "")

    # ---- the state file ----------------------------------------------------------------------------------------
    def _read_state(self, project: str) -> TrainJob | None:
        try:
            return TrainJob.from_dict(json.loads(self.state_file(project).read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:  # not ours, or edited: said, not trusted
            return TrainJob(project, "interrupted", 0.0, {}, error=f"unreadable job state ({exc}): train again")

    def _write_state(self, job: TrainJob) -> None:
        text = json.dumps(job.to_dict(), indent=1)
        write_atomically(self.state_file(job.project), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def test_metrics(model: Path) -> dict | None:
    """{"accuracy", "ci95", "n"} of a model folder's test split; None without one (a tiny project)."""
    try:
        test = json.loads((model / "metrics.json").read_text(encoding="utf-8"))["test"]
        return {"accuracy": test["accuracy"], "ci95": test.get("ci95", {}).get("accuracy"), "n": test.get("n")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no test split, or a model folder of another tlearn version


def start_child(command: list[str], log_file: Path, shown: str, cwd: Path) -> subprocess.Popen:
    """`command` in a child process of the studio's, its output into `log_file` (a file, never a pipe the server
    might stop reading), ended when the studio dies. O_NOFOLLOW: a link planted at the log's place is refused
    (403), never followed out of the workspace."""
    try:
        log = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise Rejection(403, "workspace", f"{shown} is a symbolic link: the studio writes no file through one") \
            from None
    try:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent)
    finally:
        os.close(log)


def die_with_parent() -> None:
    """In the train's child, before it runs: on Linux, SIGTERM when the studio dies (even by kill -9), so that no
    train goes on unseen; `tlearn train` then leaves no model or a whole one, never half. Elsewhere: nothing."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM now, SIGKILL if the process still runs STOP_SECONDS later (the watcher reaps it either way)."""
    process.terminate()
    timer = threading.Timer(STOP_SECONDS, lambda: process.poll() is None and process.kill())
    timer.daemon = True
    timer.start()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
