"""`tlearn serve` under load on 127.0.0.1: a mix of valid and bad requests, then SIGTERM during load.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve.py [--model DIR] [--requests 1000] [--clients 16]

Valid requests carry 1-4 photos (JPEG from ../shared/datasets/hymenoptera, a quarter re-encoded as PNG), as
multipart or as a raw body. ~20% are bad, spread over: corrupt (a PNG with garbled image data), truncated (half a
JPEG), empty, text, oversized body, a
decompression bomb (an 8000x8000 PNG), a valid JPEG sent as text/plain. Bars (issue 11): zero 5xx; every bad request
a 4xx with a JSON error naming its limit; server RSS after the run within 150 MB of RSS after warm-up; images/s at
least 70% of `tlearn predict`'s pipeline (Predictor.iter_files, model load excluded) over the same valid images,
measured in the same run; then SIGTERM while 16 clients keep sending: the server exits 0 and every request it
received was answered (its own count, logged at shutdown, equals the responses the clients got). Without --model a
model is trained on hymenoptera first (head recipe, seconds with a warm feature cache).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("TLEARN_DATASETS", ROOT.parent / "shared" / "datasets"))
BAD = {"corrupt": 422, "truncated": 422, "empty": 415, "text": 415, "oversized": 413, "bomb": 413,
       "content-type": 415}


@dataclass
class Call:
    kind: str                      # "valid" or one of BAD
    body: bytes
    content_type: str
    files: list[Path] = field(default_factory=list)   # the valid images it carries


@dataclass
class Outcome:
    kind: str
    status: int | None             # None: no HTTP answer
    seconds: float
    limit: str | None = None       # the "limit" of a JSON error body
    error: str | None = None       # transport error, when status is None


class Tally:
    """Every complete HTTP response this script got from the server (compared with the server's own count)."""

    def __init__(self):
        self.responses, self.lock = 0, threading.Lock()

    def request(self, client: httpx.Client, method: str, url: str, **kwargs) -> httpx.Response:
        response = client.request(method, url, **kwargs)
        with self.lock:
            self.responses += 1
        return response


# ---------------------------------------------------------------- the requests

def photos(tmp: Path, count: int) -> list[Path]:
    jpegs = sorted((DATASETS / "hymenoptera").rglob("*.jpg"))[:count]
    if not jpegs:
        sys.exit(f"no JPEGs under {DATASETS / 'hymenoptera'} (set TLEARN_DATASETS)")
    pngs = []
    for path in jpegs[::4]:
        pngs.append(tmp / f"{path.stem}.png")
        Image.open(path).convert("RGB").save(pngs[-1])
    return jpegs + pngs


def multipart(parts: list[tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = "tlearn-bench-7d1f"
    chunks = [f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
              f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n" for name, data, ctype in parts]
    return b"".join(chunks) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def image_type(path: Path) -> str:
    return "image/png" if path.suffix == ".png" else "image/jpeg"


def valid_call(rng: random.Random, pool: list[Path]) -> Call:
    files = rng.sample(pool, rng.randint(1, 4))
    if len(files) == 1 and rng.random() < 0.5:
        return Call("valid", files[0].read_bytes(), image_type(files[0]), files)
    body, ctype = multipart([(f.name, f.read_bytes(), image_type(f)) for f in files])
    return Call("valid", body, ctype, files)


def bad_call(kind: str, rng: random.Random, pool: list[Path], oversized: bytes, bomb: bytes) -> Call:
    jpeg = rng.choice([p for p in pool if p.suffix == ".jpg"]).read_bytes()
    png = bytearray(rng.choice([p for p in pool if p.suffix == ".png"]).read_bytes())
    middle = len(png) // 2  # inside the image data: the header reads fine, the pixels fail their checksum
    png[middle:middle + 64] = bytes(rng.getrandbits(8) for _ in range(64))
    body, ctype = {
        "corrupt": (bytes(png), "image/png"),
        "truncated": (jpeg[: len(jpeg) // 2], "image/jpeg"),
        "empty": (b"", "image/jpeg"),
        "text": (b"this is not a photo\n" * 50, "image/jpeg"),
        "oversized": (oversized, "image/jpeg"),
        "bomb": (bomb, "image/png"),
        "content-type": (jpeg, "text/plain"),
    }[kind]
    if kind in ("corrupt", "truncated", "text") and rng.random() < 0.5:  # also inside a multipart of good images
        good = pool[0].read_bytes()
        body, ctype = multipart([("ok.jpg", good, "image/jpeg"), ("bad.jpg", body, "image/jpeg")])
    return Call(kind, body, ctype)


def plan(pool: list[Path], count: int, bad_fraction: float, seed: int, max_body_mb: float) -> list[Call]:
    rng = random.Random(seed)
    oversized = os.urandom(int(max_body_mb * 1_000_000) + 500_000)
    bomb = io.BytesIO()
    Image.new("L", (8000, 8000)).save(bomb, "PNG")
    kinds = list(BAD)
    bad_count = round(count * bad_fraction)
    calls = [bad_call(kinds[i % len(kinds)], rng, pool, oversized, bomb.getvalue()) for i in range(bad_count)]
    calls += [valid_call(rng, pool) for _ in range(count - bad_count)]
    rng.shuffle(calls)
    return calls


# ---------------------------------------------------------------- the server

class Server:
    def __init__(self, model: Path, port: int, tally: Tally, log: Path):
        self.url, self.tally, self.log = f"http://127.0.0.1:{port}", tally, log
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        with open(log, "w") as sink:
            self.process = subprocess.Popen([sys.executable, "-m", "tlearn.cli", "serve", str(model), "--port",
                                             str(port), "--name", "bench"], env=env, stdout=sink,
                                            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        with httpx.Client(timeout=10) as client:
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    if self.tally.request(client, "GET", self.url + "/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        sys.exit(f"the server did not become ready:\n{log.read_text()}")

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def metric(self, name: str) -> float:
        with httpx.Client(timeout=10) as client:
            text = self.tally.request(client, "GET", self.url + "/metrics").text
        return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)", text, re.M))

    def server_count(self) -> tuple[int, int]:
        found = re.findall(r"answered (\d+) of the (\d+) requests received", self.log.read_text())
        return tuple(map(int, found[-1])) if found else (-1, -1)


def send(client: httpx.Client, tally: Tally, url: str, call: Call) -> Outcome:
    started = time.perf_counter()
    try:
        response = tally.request(client, "POST", url + "/v1/predict", content=call.body,
                                 headers={"content-type": call.content_type})
    except httpx.TransportError as exc:
        return Outcome(call.kind, None, time.perf_counter() - started, error=type(exc).__name__)
    seconds = time.perf_counter() - started
    try:
        limit = response.json().get("limit") if response.status_code >= 400 else None
    except ValueError:
        limit = "(not JSON)"
    return Outcome(call.kind, response.status_code, seconds, limit)


def load(server: Server, calls: list[Call], clients: int, max_seconds: float) -> tuple[list[Outcome], float]:
    """Send `calls` from `clients` threads (each with a keep-alive connection); stop starting new ones at the
    deadline. Returns the outcomes and the wall time."""
    queue, lock, outcomes = list(reversed(calls)), threading.Lock(), []
    deadline = time.monotonic() + max_seconds

    def client_loop() -> None:
        with httpx.Client(timeout=120) as client:
            while time.monotonic() < deadline:
                with lock:
                    if not queue:
                        return
                    call = queue.pop()
                outcomes.append(send(client, server.tally, server.url, call))

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: client_loop(), range(clients)))
    return outcomes, time.perf_counter() - started


def sigterm_under_load(server: Server, pool: list[Path], clients: int, seconds: float) -> dict:
    """Clients send valid requests non-stop; SIGTERM after `seconds`; each client stops at its first refusal."""
    outcomes, rng = [], random.Random(1)
    calls = [valid_call(rng, pool) for _ in range(64)]

    def client_loop(i: int) -> None:
        with httpx.Client(timeout=120) as client:
            for n in range(10_000):
                outcome = send(client, server.tally, server.url, calls[(i + n) % len(calls)])
                outcomes.append(outcome)
                if outcome.status is None:
                    return

    with ThreadPoolExecutor(clients) as executor:
        futures = [executor.submit(client_loop, i) for i in range(clients)]
        time.sleep(seconds)
        server.process.send_signal(signal.SIGTERM)
        for future in futures:
            future.result()
    code = server.process.wait(timeout=120)
    answered, received = server.server_count()
    return {"exit_code": code, "server_received": received, "server_answered": answered,
            "client_responses_total": server.tally.responses,
            "responses_in_phase": sum(o.status is not None for o in outcomes),
            "refused_or_closed": sorted({o.error for o in outcomes if o.status is None}),
            "5xx": sum(1 for o in outcomes if o.status and o.status >= 500)}


# ---------------------------------------------------------------- the comparison and the verdicts

def predict_rate(model: Path, files: list[Path]) -> float:
    """Images/s of `tlearn predict`'s pipeline (Predictor.iter_files) over `files`, model load excluded."""
    from tlearn.predict import Predictor

    predictor = Predictor.load(model)
    started = time.perf_counter()
    rows = sum(1 for _ in predictor.iter_files(files))
    return rows / (time.perf_counter() - started)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarise(outcomes: list[Outcome], calls: list[Call], wall: float) -> dict:
    valid = [o for o in outcomes if o.kind == "valid"]
    images = sum(len(c.files) for c in calls[:len(outcomes)])  # clients take the calls in order
    bad = [o for o in outcomes if o.kind != "valid"]
    latency = sorted(o.seconds for o in valid)
    return {
        "requests_sent": len(outcomes), "bad_requests": len(bad),
        "status_counts": {str(s): sum(o.status == s for o in outcomes) for s in sorted({o.status or 0 for o in
                                                                                          outcomes})},
        "5xx": sum(1 for o in outcomes if o.status is None or o.status >= 500),
        "valid_not_200": sum(o.status != 200 for o in valid),
        "bad_with_expected_4xx_json": sum(o.status == BAD[o.kind] and bool(o.limit) and o.limit != "(not JSON)"
                                          for o in bad),
        "bad_by_kind": {k: sorted({f"{o.status} {o.limit}" for o in bad if o.kind == k}) for k in BAD},
        "p50_ms": round(1000 * percentile(latency, 50), 1), "p99_ms": round(1000 * percentile(latency, 99), 1),
        "served_images_per_s": round(images / wall, 1), "wall_s": round(wall, 1)}


def trained_model(tmp: Path) -> Path:
    out = tmp / "hymenoptera-model"
    subprocess.run([sys.executable, "-m", "tlearn.cli", "train", str(DATASETS / "hymenoptera"), "--out", str(out),
                    "--quiet"], check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                   stdout=subprocess.DEVNULL)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model folder [default: train one on hymenoptera]")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--bad-fraction", type=float, default=0.2)
    parser.add_argument("--photos", type=int, default=200, help="distinct JPEGs drawn from (plus 1/4 as PNG)")
    parser.add_argument("--max-seconds", type=float, default=900, help="stop sending after this long")
    parser.add_argument("--sigterm-after", type=float, default=3.0, help="seconds of load before SIGTERM")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlearn-bench-serve-") as folder:
        tmp = Path(folder)
        model = args.model or trained_model(tmp)
        pool = photos(tmp, args.photos)
        calls = plan(pool, args.requests, args.bad_fraction, args.seed, max_body_mb=20)
        tally = Tally()
        server = Server(model, free_port(), tally, tmp / "server.log")
        warm, _ = load(server, [valid_call(random.Random(9), pool) for _ in range(32)], args.clients, 120)
        rss_warm = server.rss_mb()
        outcomes, wall = load(server, calls, args.clients, args.max_seconds)
        rss_after = server.rss_mb()
        result = summarise(outcomes, calls, wall)
        result.update(rss_after_warmup_mb=round(rss_warm, 1), rss_after_run_mb=round(rss_after, 1),
                      batches=server.metric("tlearn_batch_size_count"),
                      images_in_batches=server.metric("tlearn_batch_size_sum"))
        result["sigterm"] = sigterm_under_load(server, pool, args.clients, args.sigterm_after)
        sent = [f for c in calls[:len(outcomes)] for f in c.files]  # the same valid images, in the same order
        result["predict_images_per_s"] = round(predict_rate(model, sent), 1)
    result["bars"] = bars(result, args)
    print(json.dumps(result, indent=1))
    sys.exit(0 if all(result["bars"].values()) else 1)


def bars(r: dict, args) -> dict:
    s = r["sigterm"]
    return {"all_requests_sent": r["requests_sent"] == args.requests,
            "zero_5xx": r["5xx"] == 0 and s["5xx"] == 0,
            "valid_all_200": r["valid_not_200"] == 0,
            "bad_all_expected_4xx_json": r["bad_with_expected_4xx_json"] == r["bad_requests"],
            "rss_within_150_mb": r["rss_after_run_mb"] - r["rss_after_warmup_mb"] <= 150,
            "throughput_at_least_70pct_of_predict": r["served_images_per_s"] >= 0.7 * r["predict_images_per_s"],
            "sigterm_exit_0": s["exit_code"] == 0,
            "sigterm_every_received_request_answered": s["server_received"] == s["server_answered"] ==
            s["client_responses_total"]}


if __name__ == "__main__":
    main()
