"""`tlearn serve` in a child process on 127.0.0.1, as a user starts it (used by test_serve and test_serve_page)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RealServer:
    """`tlearn serve` in a child process, as a user starts it."""

    def __init__(self, model_dir: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: an unread pipe would block the server
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        self.process = subprocess.Popen([sys.executable, "-m", "tlearn.cli", "serve", str(model_dir), "--port",
                                         str(self.port), *args], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not self.ready():
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.2)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def ready(self) -> bool:
        try:
            return urllib.request.urlopen(self.url + "/readyz", timeout=2).status == 200
        except (OSError, urllib.error.URLError):
            return False

    def post(self, path: str, body: bytes, content_type: str) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=body, headers={"content-type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def multipart(contents: list[bytes]) -> tuple[bytes, str]:
    boundary = "tlearn-test-boundary"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{i}.png\"\r\n"
             f"Content-Type: image/png\r\n\r\n".encode() + c + b"\r\n" for i, c in enumerate(contents)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
