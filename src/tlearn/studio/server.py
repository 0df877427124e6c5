"""Run the studio under uvicorn in this process: bind, print the URL with its token, open the browser, serve.

The same server stack as `tlearn serve` (its socket binding and per-request header deadline). SIGTERM or Ctrl-C
stops the running trains (recorded as interrupted) and exits 0.
"""
from __future__ import annotations

import signal
import socket
import threading
import webbrowser
from dataclasses import replace
from pathlib import Path
from typing import Callable

import uvicorn

from tlearn.errors import InvalidParameter
from tlearn.serve.server import listen, with_header_deadline
from tlearn.studio.app import create_app
from tlearn.studio.guard import StudioSettings

HEADER_TIMEOUT_S = 10.0
SHUTDOWN_S = 3  # open event streams (a page following a train) are closed after this


def prepare_workspace(path: Path) -> tuple[Path, bool]:
    """The workspace folder, made when absent (its parent must exist); and whether it was made."""
    path = path.expanduser()
    if path.is_dir():
        return path, False
    if path.exists() or not path.parent.is_dir():
        raise InvalidParameter(f"cannot use {path} as the workspace: it is a file, or its parent folder does not "
                               "exist")
    path.mkdir()
    return path, True


def run(settings: StudioSettings, open_browser: bool = True, say: Callable[[str], None] = print,
        log_level: str = "warning") -> None:
    """Serve the studio until SIGTERM or Ctrl-C; `say` prints the lines a person reads (the URL first)."""
    workspace, made = prepare_workspace(settings.workspace)
    sock = listen(settings.host, settings.port)
    sock.listen(socket.SOMAXCONN)  # a browser opened before uvicorn starts waits in the backlog, not refused
    settings = replace(settings, workspace=workspace, port=sock.getsockname()[1])
    try:
        app = create_app(settings)
    except BaseException:
        sock.close()
        raise
    url = settings.url("127.0.0.1" if settings.loopback else socket.gethostname())
    say(f"tlearn studio: {'made ' if made else ''}workspace {app.state.jobs.workspace.root}")
    say(f"open {url}")
    if not settings.loopback:
        say(f"listening on {settings.host}:{settings.port}, beyond this machine: anyone on the network with the "
            "token can use the studio (the token is in the URL above)")
    say("Ctrl-C stops the studio (and any train it runs)")
    if open_browser:
        threading.Thread(target=webbrowser.open, args=(url,), daemon=True, name="tlearn-studio-browser").start()
    config = uvicorn.Config(app, lifespan="on", log_level=log_level, http=with_header_deadline(HEADER_TIMEOUT_S),
                            timeout_graceful_shutdown=SHUTDOWN_S)
    # uvicorn re-raises the stop signal once it has stopped; a stop we handled is a clean exit (code 0)
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
