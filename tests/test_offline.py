"""No outbound connection: `tlearn train` and `tlearn predict` run under a socket guard (tests/netguard) that
records any attempt to resolve or reach a non-loopback address; the guard is shown to catch real attempts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

GUARD = Path(__file__).parent / "netguard"
SRC = Path(__file__).resolve().parents[1] / "src"


def _guarded_run(args: list[str], tmp_path: Path, timeout: float = 900) -> tuple[subprocess.CompletedProcess, str]:
    """Run `python args...` under the guard, as a new user would: a fresh home and cache, no opt-outs set."""
    log = tmp_path / "attempts.log"
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "CI", "TF_BUILD", "JENKINS_URL")}
    env.update(PYTHONPATH=os.pathsep.join([str(GUARD), str(SRC), env.get("PYTHONPATH", "")]),
               TLEARN_NETGUARD_LOG=str(log), HOME=str(home), TLEARN_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                            cwd=tmp_path)
    return result, log.read_text() if log.exists() else ""


@pytest.mark.parametrize("code", [
    "import socket; socket.create_connection(('192.0.2.1', 443), timeout=1)",
    "import urllib.request; urllib.request.urlopen('https://pypi.org/simple/', timeout=1)",
    "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'x', ('192.0.2.1', 53))",
])
def test_the_guard_catches_a_deliberate_connection(tmp_path, code):
    result, attempts = _guarded_run(["-c", code], tmp_path)
    assert result.returncode != 0 and "tlearn test guard" in result.stderr
    assert attempts


def test_the_guard_lets_loopback_through(tmp_path):
    code = ("import socket; server = socket.create_server(('127.0.0.1', 0)); "
            "socket.create_connection(server.getsockname(), timeout=5).close()")
    result, attempts = _guarded_run(["-c", code], tmp_path)
    assert result.returncode == 0, result.stderr
    assert attempts == ""


def test_openvino_telemetry_is_what_the_guard_would_catch_and_quiet_openvino_stops_it(tmp_path):
    wait = "import time; time.sleep(2)"  # the event is sent from a background thread
    _, attempts = _guarded_run(["-c", f"import openvino; {wait}"], tmp_path)
    assert "google-analytics" in attempts  # not quieted: OpenVINO phones home on import
    (tmp_path / "attempts.log").unlink()
    _, attempts = _guarded_run(["-c", "from tlearn.engines.offline import quiet_openvino; quiet_openvino(); "
                                      f"import openvino; openvino.Core(); {wait}"], tmp_path)
    assert attempts == ""


@pytest.mark.slow
def test_demo_train_evaluate_predict_doctor_export_make_no_outbound_connection(tmp_path):
    """`make demo` (tlearn demo: build the data, train, evaluate, predict), then doctor and export, as a new
    user on a fresh home and cache: not one attempt to resolve or reach an address outside loopback."""
    result, attempts = _guarded_run(["-m", "tlearn.cli", "demo", "--out", str(tmp_path / "demo")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy" in result.stdout or "accuracy" in result.stdout
    assert attempts == ""
    for args in (["predict", str(tmp_path / "demo/model"), str(tmp_path / "demo/data/test"), "--engine", "openvino"],
                 ["doctor", str(tmp_path / "demo/data"), "-q"],
                 ["export", str(tmp_path / "demo/model"), "--out", str(tmp_path / "model.onnx")]):
        result, attempts = _guarded_run(["-m", "tlearn.cli", *args], tmp_path)
        assert result.returncode == 0, (args, result.stderr[-3000:])
        assert attempts == "", args
