"""`tlearn` command line: parse arguments, call the Python API, print. No logic of its own.

Everything heavy is imported inside the command that needs it: `tlearn --help` and `tlearn predict` must start
fast, and predicting needs no torch. One module per group of commands; they register on the one typer app.
"""
from __future__ import annotations

import os
import sys
from typing import NoReturn

from tlearn.cli import data, model, predict, studio, train  # noqa: F401  (each registers its commands on the app)
from tlearn.cli.common import app
from tlearn.console import err

__all__ = ["app", "main"]

# `tlearn --help` lists the commands in the order a newcomer uses them, not in the order of the modules' imports
ORDER = ("studio", "train", "predict", "explain", "evaluate", "report", "export", "serve", "doctor", "relabel",
         "backbones", "fetch-weights", "demo")
app.registered_commands.sort(key=lambda command: ORDER.index(command.name or command.callback.__name__))


class Interrupted(BaseException):
    """Ctrl-C, raised past click (which would print "Aborted!" and exit 1) so that main can say what was kept."""


def _interrupt(signum, frame) -> None:
    raise Interrupted


def main() -> None:
    """The `tlearn` console script: the typer app, with Ctrl-C explained (exit 130), then a quick exit."""
    import signal

    signal.signal(signal.SIGINT, _interrupt)
    try:
        app()
    except Interrupted:
        err.print("\ninterrupted: nothing half-written was kept (a model folder and an output file appear whole or "
                  "not at all); the same command continues from the features cached so far (a fine-tune with "
                  "--resume)", highlight=False, soft_wrap=True)
        _leave(130)
    except SystemExit as done:  # typer ends every command with one
        _leave(done.code)


def _leave(code: int | str | None) -> NoReturn:
    """Exit once the command's work is done and flushed, without the interpreter's teardown.

    Tearing down a process that loaded torch, timm and OpenVINO (freeing ~400,000 objects module by module, then the
    libraries' static destructors) took 1.4-1.7 s here, a sixth of a first `tlearn train`; a re-train spends 0.23 s
    on it. Everything a command writes is closed and fsynced before it returns, and the atexit handlers (Ray's
    shutdown, temporary folders, logging) still run. Non-daemon threads still running (none in tlearn's commands)
    get the normal, waiting exit instead."""
    import atexit
    import threading

    if isinstance(code, str):
        err.print(code, highlight=False)
        code = 1
    code = 0 if code is None else code
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread()):
        raise SystemExit(code)
    if sys.getprofile() is not None or sys.gettrace() is not None:  # a profiler or debugger writes its results
        raise SystemExit(code)  # at the normal exit (python -m cProfile ...)
    atexit._run_exitfuncs()  # the one way to run them without the teardown that follows in sys.exit
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away (`| head`), or a stream already closed
            pass
    os._exit(code)
