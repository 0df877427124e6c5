"""Open a local HTML file in a real headless Chromium (over the DevTools protocol) as a person's browser would.

Used by tests/test_report.py and bench/evaluation_bars.py. Nothing is installed here: `make browser` (a step of
`make test`) installs Debian's `chromium`; without it `chromium_binary()` raises ChromiumMissing, which says so.
"""
from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from websockets.sync.client import connect

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--window-size=1200,1600"]
IMAGES_JS = ("JSON.stringify(Array.from(document.images).map(i => ({src: i.getAttribute('src'), "
             "complete: i.complete, width: i.naturalWidth})))")


INSTALL_COMMAND = "make browser  (or: apt-get update && apt-get install -y chromium)"


class ChromiumMissing(RuntimeError):
    """No chromium on PATH; the message gives the command that installs it."""


def chromium_binary() -> str:
    """Path of the chromium binary; raise ChromiumMissing (with the install command) when there is none."""
    found = shutil.which("chromium")
    if found is None:
        raise ChromiumMissing(f"chromium is not installed; install it with: {INSTALL_COMMAND}")
    return found


def render(html_path: Path, screenshot: Path, binary: str = "chromium", timeout: float = 60) -> list[dict]:
    """Load `html_path`, save a full-page PNG screenshot, return every <img> with its naturalWidth."""
    with devtools_page(binary, timeout) as (call, ws):
        call("Page.navigate", url=Path(html_path).resolve().as_uri())
        _wait_for_event(ws, "Page.loadEventFired", timeout)
        images = json.loads(call("Runtime.evaluate", expression=IMAGES_JS)["result"]["value"])
        shot = call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    return images


@contextmanager
def devtools_page(binary: str, timeout: float = 60, flags: Sequence[str] = ()) -> Iterator[tuple]:
    """A headless Chromium (a fresh profile, `flags` added to ours) with its one page, as (call, ws):
    `call(method, **params)` sends a DevTools command and returns its result; Page events are enabled. The browser
    is stopped on exit."""
    # chromium's helper processes can still be writing the profile as the browser exits: do not fail on cleanup
    with tempfile.TemporaryDirectory(prefix="tlearn-chromium-", ignore_cleanup_errors=True) as profile:
        browser = subprocess.Popen([binary, *FLAGS, *flags, f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                    "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = _devtools_port(Path(profile), browser, timeout)
            pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout))
            page = next(p for p in pages if p["type"] == "page")
            with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout) as ws:
                call = _caller(ws, timeout)
                call("Page.enable")
                yield call, ws
        finally:
            browser.terminate()
            browser.wait(timeout=30)


def _devtools_port(profile: Path, browser: subprocess.Popen, timeout: float) -> int:
    marker, deadline = profile / "DevToolsActivePort", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text().strip():
            return int(marker.read_text().splitlines()[0])
        if browser.poll() is not None:
            raise RuntimeError(f"chromium exited with code {browser.returncode} before opening DevTools")
        time.sleep(0.1)
    raise TimeoutError("chromium did not open its DevTools port")


def _caller(ws, timeout: float):
    ids = itertools.count(1)

    def call(method: str, **params) -> dict:
        message_id = next(ids)
        ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(ws.recv(timeout=timeout))
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    return call


def _wait_for_event(ws, name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if json.loads(ws.recv(timeout=timeout)).get("method") == name:
            return
    raise TimeoutError(f"no {name} within {timeout}s")
