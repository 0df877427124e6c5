"""`tlearn serve` started from the studio's page: one server per project, a child process on a free loopback port,
serving the version the page chose; stopped from the page, and with the studio (kill -9 included, as trains are).

The child is the real `tlearn serve` (its batcher, limits, web page and KServe routes): what the page shows is what
a user would run by hand, and the page's curl line works against it as printed.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from tlearn.serve.limits import Rejection
from tlearn.studio.jobs import start_child, stop_process
from tlearn.studio.workspace import Workspace, check_name

HOST = "127.0.0.1"  # a served model never leaves this machine from the studio: `tlearn serve --host` by hand does
READY_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Served:
    """A project's model server as the page shows it."""

    project: str
    version: int
    url: str
    state: str  # "starting", "ready", "stopped" (it exited: `error` says how)
    pid: int | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class ModelServers:
    """The `tlearn serve` children of a workspace's projects, at most one per project."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self._lock = threading.Lock()
        self._running: dict[str, tuple[subprocess.Popen, int, int]] = {}  # project -> (process, version, port)

    def log_file(self, project: str) -> Path:
        folder = self.workspace.inside(self.workspace.studio_dir / "serve", ".studio/serve")
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{check_name(project, 'project')}.log"

    def start(self, project: str, version: int | None) -> Served:
        """Serve `version` (None: the newest) of the project's model; a server already running is replaced."""
        folder = self.workspace.model_dir(project, version)
        if not (folder / "config.json").is_file():
            raise Rejection(409, "model", f"project {project!r} has no trained model yet: train it first")
        number = int(folder.name)
        self.stop(project, missing_ok=True)
        port = _free_port()
        command = [sys.executable, "-m", "tlearn.cli", "serve", str(folder), "--host", HOST, "--port", str(port),
                   "--name", check_name(project, "project")]
        process = start_child(command, self.log_file(project), f".studio/serve/{project}.log", self.workspace.root)
        with self._lock:
            self._running[project] = (process, number, port)
        return self.state(project)

    def state(self, project: str) -> Served:
        """The project's server: starting, ready (its /readyz answers 200) or stopped; 404 when none was started."""
        self.workspace.project_dir(project)
        with self._lock:
            entry = self._running.get(project)
        if entry is None:
            raise Rejection(404, "server", f"no server of {project!r} was started: start one first")
        process, version, port = entry
        url = f"http://{HOST}:{port}"
        if process.poll() is not None:
            return Served(project, version, url, "stopped", error=self._exit_reason(project, process.returncode))
        return Served(project, version, url, "ready" if _ready(url) else "starting", pid=process.pid)

    def stop(self, project: str, missing_ok: bool = False) -> Served | None:
        with self._lock:
            entry = self._running.pop(project, None)
        if entry is None:
            if missing_ok:
                return None
            raise Rejection(409, "no-server", f"no server of {project!r} is running")
        process, version, port = entry
        if process.poll() is None:
            stop_process(process)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return Served(project, version, f"http://{HOST}:{port}", "stopped")

    def stop_all(self) -> None:
        with self._lock:
            projects = list(self._running)
        for project in projects:
            self.stop(project, missing_ok=True)

    def _exit_reason(self, project: str, code: int) -> str:
        try:
            lines = [line for line in self.log_file(project).read_text("utf-8", "replace").splitlines()
                     if line.strip()]
        except OSError:
            lines = []
        errors = [line.removeprefix("error:").strip() for line in lines if line.startswith("error:")]
        return errors[-1] if errors else f"tlearn serve exited with code {code}" + (f": {lines[-1]}" if lines
                                                                                    else "")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=READY_TIMEOUT_S) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False

