"""tlearn serve: every endpoint and every refusal in-process, then a real uvicorn under 16 concurrent clients,
a standard KServe v2 client (tritonclient) against it, and a SIGTERM drain."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from served_process import RealServer, multipart  # noqa: E402
from tlearn.predict import Predictor  # noqa: E402
from tlearn.serve import ServeSettings, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = dict(name="demo", max_images=4, max_body_mb=2, max_pixels=2_000_000)


# ---------------------------------------------------------------- fixtures: a real model, real images

@pytest.fixture(scope="module")
def model_dir(demo_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "demo-model"
    demo_model.save(path)
    return path


@pytest.fixture(scope="module")
def predictor(model_dir) -> Predictor:
    return Predictor.load(model_dir)


@pytest.fixture(scope="module")
def photos(demo_data) -> list[Path]:
    """Two test photos per class (greyscale PNG crops of real photos)."""
    return [p for cls in ("brick", "grass", "gravel") for p in sorted((demo_data / "test" / cls).glob("*.png"))[:2]]


def as_jpeg(path: Path) -> bytes:
    out = io.BytesIO()
    Image.open(path).convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def png_bytes(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height)).save(out, "PNG")
    return out.getvalue()


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "warm-up never finished"
        time.sleep(0.05)


def start(predictor, **overrides) -> TestClient:
    return TestClient(create_app(predictor, ServeSettings(**{**SETTINGS, **overrides})),
                      raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(predictor):
    with start(predictor) as client:
        wait_ready(client)
        yield client


def expected(predictor, images) -> np.ndarray:
    return predictor.probabilities(np.stack([predictor.to_pixels(image) for image in images]))


def v1_scores(answer: dict, classes: list[str]) -> np.ndarray:
    """Probability rows (in class order) from a v1 answer asked with top_k = number of classes."""
    return np.array([[dict((t["label"], t["score"]) for t in p["top_k"])[c] for c in classes]
                     for p in answer["predictions"]])


# ---------------------------------------------------------------- endpoints, in-process

def test_page_is_one_self_contained_file(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '"demo"' in page.text and 'type="file"' in page.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text), "the page must not load anything remote"


def test_health_and_readiness(client, predictor):
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/ping").json() == {"status": "Healthy"}
    service = client.app.state.service
    service.draining = True  # what SIGTERM sets (serve.server.DrainingServer)
    try:
        assert client.get("/readyz").status_code == 503 and client.get("/readyz").json() == {"status": "draining"}
        assert client.get("/v2/health/ready").status_code == 503 and client.get("/ping").status_code == 503
    finally:
        service.draining = False


def test_readyz_is_503_until_warm_up(predictor):
    app = create_app(predictor, ServeSettings(**SETTINGS))
    cold = TestClient(app)  # not entered: the lifespan (batcher, warm-up) has not run
    assert cold.get("/readyz").status_code == 503 and cold.get("/readyz").json() == {"status": "warming up"}
    assert cold.get("/v2/health/ready").status_code == 503


def test_v1_multipart_raw_and_json_give_predictor_probabilities_in_order(client, predictor, photos):
    classes, k = predictor.classes, len(predictor.classes)
    contents = [p.read_bytes() for p in photos[:4]]
    want = expected(predictor, contents)
    multipart = client.post(f"/v1/predict?top_k={k}",
                            files=[(f"field{i}", (p.name, c, "image/png")) for i, (p, c) in
                                   enumerate(zip(photos, contents))])
    assert multipart.status_code == 200, multipart.text
    np.testing.assert_allclose(v1_scores(multipart.json(), classes), want, atol=1e-6)
    as_json = client.post(f"/v1/predict?top_k={k}",
                          json={"instances": [{"b64": base64.b64encode(c).decode()} for c in contents]})
    np.testing.assert_allclose(v1_scores(as_json.json(), classes), want, atol=1e-6)
    raw = client.post(f"/v1/predict?top_k={k}", content=contents[2], headers={"content-type": "image/png"})
    np.testing.assert_allclose(v1_scores(raw.json(), classes), want[2:3], atol=1e-6)
    answer = multipart.json()
    assert [p["label"] for p in answer["predictions"]] == [classes[i] for i in want.argmax(axis=1)]
    assert answer["model"]["name"] == "demo" and len(answer["model"]["model_sha256"]) == 64


def test_v1_top_k_and_uncertain(client, photos):
    one = client.post("/v1/predict", content=photos[0].read_bytes(), headers={"content-type": "image/png"}).json()
    assert len(one["predictions"][0]["top_k"]) == 1 and one["predictions"][0]["uncertain"] is False
    unsure = client.post("/v1/predict?top_k=2&min_confidence=1", content=photos[0].read_bytes(),
                         headers={"content-type": "image/png"}).json()["predictions"][0]
    assert unsure["uncertain"] is True and unsure["label"] == "uncertain" and len(unsure["top_k"]) == 2


def test_model_card(client, predictor):
    info = client.get("/v1/models/demo").json()
    assert info["ready"] is True and info["card"]["classes"] == predictor.classes
    assert info["card"]["model_sha256"] == predictor.card.to_dict()["model_sha256"]


def test_torchserve_route_raw_and_multipart(client, predictor, photos):
    jpeg = as_jpeg(photos[0])
    single = client.put("/predictions/demo", content=jpeg)  # what `curl -T photo.jpg` sends: PUT, no content type
    assert single.status_code == 200
    want = expected(predictor, [jpeg])[0]
    assert list(single.json()) == [predictor.classes[i] for i in np.argsort(-want)][:5]
    np.testing.assert_allclose(max(single.json().values()), want.max(), atol=1e-6)
    several = client.post("/predictions/demo", files=[("data", ("a.jpg", jpeg)), ("data", ("b.png",
                                                                                         photos[3].read_bytes()))])
    assert isinstance(several.json(), list) and len(several.json()) == 2
    assert client.post("/predictions/demo/1.0", content=jpeg, headers={"content-type": "image/jpeg"}).json() == \
        single.json()


def test_v2_metadata_names_inputs_and_outputs(client, predictor):
    assert client.get("/v2").json()["name"] == "tlearn"
    meta = client.get("/v2/models/demo").json()
    assert [i["name"] for i in meta["inputs"]] == ["image"] and meta["inputs"][0]["datatype"] == "BYTES"
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {"probabilities": [-1, len(predictor.classes)],
                                                                  "label": [-1]}
    assert client.get("/v2/models/demo/ready").json() == {"name": "demo", "ready": True}
    assert client.get("/v2/models/demo/versions/1").json()["name"] == "demo"


def test_v2_json_bytes_and_uint8_pixels(client, predictor, photos):
    contents = [p.read_bytes() for p in photos[:2]]
    want = expected(predictor, contents)
    request = {"id": "r1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                        "data": [base64.b64encode(c).decode() for c in contents]}]}
    answer = client.post("/v2/models/demo/infer", json=request).json()
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert answer["id"] == "r1" and outputs["probabilities"]["shape"] == [2, len(predictor.classes)]
    np.testing.assert_allclose(np.reshape(outputs["probabilities"]["data"], (2, -1)), want, atol=1e-6)
    assert outputs["label"]["data"] == [predictor.classes[i] for i in want.argmax(axis=1)]
    rgb = np.asarray(Image.open(photos[0]).convert("RGB"))
    pixels = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, *rgb.shape],
                          "data": rgb.ravel().tolist()}], "outputs": [{"name": "probabilities"}]}
    answer = client.post("/v2/models/demo/infer", json=pixels).json()
    assert [o["name"] for o in answer["outputs"]] == ["probabilities"]
    np.testing.assert_allclose(answer["outputs"][0]["data"], expected(predictor, [rgb])[0], atol=1e-6)


# ---------------------------------------------------------------- every refusal: status, JSON body naming the limit

def _multipart(*contents: bytes) -> dict:
    return {"files": [("file", (f"{i}.bin", c, "application/octet-stream")) for i, c in enumerate(contents)]}


def _raw(content: bytes, content_type: str = "image/jpeg") -> dict:
    return {"content": content, "headers": {"content-type": content_type}}


@pytest.fixture(scope="module")
def jpeg(photos) -> bytes:
    return as_jpeg(photos[0])


REFUSALS = {  # name: (path, request kwargs built from a valid jpeg, status, limit, index)
    "body too large": ("/v1/predict", lambda j: _raw(b"\xff" * 2_100_000), 413, "max-body-mb", None),
    "body far too large": ("/v1/predict", lambda j: _raw(b"\xff" * 4_500_000), 413, "max-body-mb", None),
    "too many images": ("/v1/predict", lambda j: _multipart(*[j] * 5), 413, "max-images", None),
    "decompression bomb": ("/v1/predict", lambda j: _raw(png_bytes(3000, 3000), "image/png"), 413, "max-pixels", 0),
    "wrong content type": ("/v1/predict", lambda j: _raw(j, "text/plain"), 415, "content-type", None),
    "text as image": ("/v1/predict", lambda j: _multipart(j, b"just some text"), 415, "image-format", 1),
    "empty image": ("/v1/predict", lambda j: _raw(b""), 415, "image-format", 0),
    "truncated image": ("/v1/predict", lambda j: _multipart(j, j, j[: len(j) // 2]), 422, "decodable-image", 2),
    "corrupt image": ("/v1/predict", lambda j: _raw(j[:200] + bytes(len(j) - 200)), 422, "decodable-image", 0),
    "no image": ("/v1/predict", lambda j: {"json": {"instances": []}}, 400, "images", None),
    "bad base64": ("/v1/predict", lambda j: {"json": {"instances": [{"b64": "***"}]}}, 400, "base64", 0),
    "bad parameter": ("/v1/predict?top_k=0", lambda j: _raw(j), 400, "parameters", None),
    "unknown model": ("/predictions/other", lambda j: _raw(j), 404, "model-name", None),
    "unknown route": ("/v3/predict", lambda j: _raw(j), 404, "route", None),
    "v2 datatype": ("/v2/models/demo/infer", lambda j: {"json": {"inputs": [
        {"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}}, 415, "v2-datatype", None),
    "v2 input name": ("/v2/models/demo/infer", lambda j: {"json": {"inputs": [
        {"name": "x", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]}}, 400, "v2-inputs", None),
    "v2 too many": ("/v2/models/demo/infer", lambda j: {"json": {"inputs": [
        {"name": "image", "datatype": "BYTES", "shape": [5], "data": ["AA=="] * 5}]}}, 413, "max-images", None),
    "v2 pixel bomb": ("/v2/models/demo/infer", lambda j: {"json": {"inputs": [
        {"name": "image", "datatype": "UINT8", "shape": [1, 2000, 2000, 3], "data": [0]}]}}, 413, "max-pixels",
        None),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_every_refusal_is_json_naming_its_limit(client, jpeg, case):
    path, build, status, limit, index = REFUSALS[case]
    response = client.post(path, **build(jpeg))
    assert response.status_code == status, response.text
    body = response.json()
    assert body["limit"] == limit and body["status"] == status and isinstance(body["error"], str)
    assert body.get("index") == index
    assert "Traceback" not in response.text
    assert client.get("/healthz").status_code == 200  # and the server is still up


def test_queue_full_is_503_with_retry_after(predictor, jpeg):
    with start(predictor, queue=1) as client:
        service = client.app.state.service
        with service.admission:  # one request already in the pipeline fills a queue of one
            busy = client.post("/v1/predict", **_raw(jpeg))
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["limit"] == "queue"
        assert client.post("/v1/predict", **_raw(jpeg)).status_code == 200


def test_slow_body_is_408():
    from starlette.requests import Request

    from tlearn.serve.limits import Rejection, read_body

    async def stalled_receive():  # a client that sent its headers and then nothing
        await asyncio.sleep(3600)

    request = Request({"type": "http", "method": "POST", "headers": [(b"content-length", b"1000")]}, stalled_receive)
    with pytest.raises(Rejection) as refused:
        asyncio.run(read_body(request, ServeSettings(**{**SETTINGS, "timeout_s": 0.2})))
    assert refused.value.status == 408 and refused.value.limit == "timeout-s"


class SlowPredictor:
    """The real predictor whose engine takes `delay` seconds longer (or fails), to reach the timeout and 500 paths."""

    def __init__(self, predictor, delay: float = 0.0, fail: bool = False):
        self._predictor, self.delay, self.fail = predictor, delay, fail

    def __getattr__(self, name):
        return getattr(self._predictor, name)

    def probabilities(self, pixels):
        if self.fail and len(pixels) < 16:  # the warm-up batch passes, requests fail
            raise RuntimeError("engine exploded at /secret/path")
        time.sleep(self.delay)
        return self._predictor.probabilities(pixels)


def test_over_time_is_504(predictor, jpeg):
    with start(SlowPredictor(predictor, delay=1.0), timeout_s=0.3, max_batch=1) as client:
        wait_ready(client)
        late = client.post("/v1/predict", **_raw(jpeg))
        assert late.status_code == 504 and late.json()["limit"] == "timeout-s"


def test_unexpected_error_is_500_json_without_traceback(predictor, jpeg):
    with start(SlowPredictor(predictor, fail=True), max_batch=16) as client:
        wait_ready(client)
        broken = client.post("/v1/predict", **_raw(jpeg))
        assert broken.status_code == 500 and broken.json()["limit"] == "internal"
        assert "secret" not in broken.text and "Traceback" not in broken.text
        assert client.get("/healthz").status_code == 200


def test_token_is_required_except_for_health_probes(predictor, jpeg):
    with start(predictor, token="s3cret") as client:
        wait_ready(client)
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            refused = client.post("/v1/predict", content=jpeg, headers={**headers, "content-type": "image/jpeg"})
            assert refused.status_code == 401 and refused.json()["limit"] == "token"
            assert refused.headers["www-authenticate"] == "Bearer"
        for path in ("/metrics", "/v1/models/demo", "/v2/models/demo"):
            assert client.get(path).status_code == 401
        for path in ("/healthz", "/readyz", "/v2/health/ready", "/ping", "/"):
            assert client.get(path).status_code == 200
        ok = client.post("/v1/predict", content=jpeg, headers={"authorization": "Bearer s3cret",
                                                               "content-type": "image/jpeg"})
        assert ok.status_code == 200


def test_metrics_count_routes_statuses_rejections_and_batches(client, jpeg):
    client.post("/v1/predict", **_raw(jpeg))
    client.post("/v1/predict", **_raw(b"not an image"))
    text = client.get("/metrics").text
    assert re.search(r'tlearn_requests_total\{route="/v1/predict",status="200"\} [1-9]', text)
    assert re.search(r'tlearn_requests_total\{route="/v1/predict",status="415"\} [1-9]', text)
    assert re.search(r'tlearn_rejections_total\{reason="image-format"\} [1-9]', text)
    assert re.search(r'tlearn_request_seconds_count\{route="/v1/predict"\} [1-9]', text)
    assert "tlearn_batch_size_bucket" in text and "tlearn_queue_requests" in text
    assert re.search(r'tlearn_model_info\{.*name="demo".*\} 1', text)


# ---------------------------------------------------------------- a real server on 127.0.0.1

@pytest.fixture(scope="module")
def server(model_dir):
    server = RealServer(model_dir, "--batch-timeout-ms", "30", "--name", "demo")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def photo_files(photos, tmp_path_factory) -> list[Path]:
    """The demo PNGs and the same photos as JPEG files."""
    folder = tmp_path_factory.mktemp("served-photos")
    for p in photos:
        (folder / f"{p.stem}.jpg").write_bytes(as_jpeg(p))
    return [*photos, *sorted(folder.glob("*.jpg"))]


def cli_probabilities(model_dir: Path, files: list[Path], k: int) -> dict[str, dict[str, float]]:
    """`tlearn predict --format json --top-k K` as a user runs it: path -> {label: probability}."""
    run = subprocess.run([sys.executable, "-m", "tlearn.cli", "predict", str(model_dir), *map(str, files),
                          "--format", "json", "--top-k", str(k)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    rows = json.loads(run.stdout)["predictions"]
    return {row["path"]: {t["label"]: t["score"] for t in row["top"]} for row in rows}


def batch_histogram(metrics: str) -> tuple[float, float]:
    """(engine calls, engine calls with exactly one image) from the /metrics text."""
    count = float(re.search(r"^tlearn_batch_size_count (\S+)", metrics, re.M).group(1))
    single = float(re.search(r'^tlearn_batch_size_bucket\{le="1\.0"\} (\S+)', metrics, re.M).group(1))
    return count, single


def test_real_server_batches_16_clients_and_matches_tlearn_predict(server, model_dir, predictor, photo_files):
    classes = predictor.classes
    barrier = threading.Barrier(16)

    def client(i: int) -> list[tuple[Path, dict]]:
        barrier.wait()
        answers = []
        for j in range(3):
            path = photo_files[(i * 3 + j) % len(photo_files)]
            status, body = server.post(f"/v1/predict?top_k={len(classes)}", path.read_bytes(),
                                       "image/jpeg" if path.suffix == ".jpg" else "image/png")
            assert status == 200, body
            answers.append((path, body["predictions"][0]))
        return answers

    with ThreadPoolExecutor(16) as pool:
        answers = [a for result in pool.map(client, range(16)) for a in result]
    with urllib.request.urlopen(server.url + "/metrics") as response:
        calls, single = batch_histogram(response.read().decode())
    assert calls - single >= 1, "no batch of more than one image was formed"
    cli = cli_probabilities(model_dir, photo_files, len(classes))
    for path, prediction in answers:
        served = {t["label"]: t["score"] for t in prediction["top_k"]}
        np.testing.assert_allclose([served[c] for c in classes], [cli[str(path)][c] for c in classes], atol=1e-5)


def test_tritonclient_v2_against_real_server(server, predictor, photo_files):
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("demo")
    meta = client.get_model_metadata("demo")
    assert meta["inputs"][0]["name"] == "image"
    contents = [p.read_bytes() for p in photo_files[:3]]
    image = httpclient.InferInput("image", [3], "BYTES")
    image.set_data_from_numpy(np.array(contents, dtype=np.object_), binary_data=True)
    result = client.infer("demo", [image])  # no outputs named: all of them, as binary tensors
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (3, len(predictor.classes))
    np.testing.assert_allclose(probabilities, expected(predictor, contents), atol=1e-5)
    assert [b.decode() for b in result.as_numpy("label")] == [predictor.classes[i]
                                                               for i in probabilities.argmax(axis=1)]
    wanted = [httpclient.InferRequestedOutput("label", binary_data=False)]
    assert result.as_numpy("label") is not None
    assert client.infer("demo", [image], outputs=wanted).as_numpy("label").shape == (3,)
    with pytest.raises(httpclient.InferenceServerException, match="max-images|over the limit"):
        many = httpclient.InferInput("image", [40], "BYTES")
        many.set_data_from_numpy(np.array([contents[0]] * 40, dtype=np.object_), binary_data=True)
        client.infer("demo", [many])
    client.close()


def test_sigterm_answers_every_accepted_request_and_exits_0(model_dir, photo_files):
    server = RealServer(model_dir, "--max-batch", "2", "--batch-timeout-ms", "1")
    body, content_type = multipart([p.read_bytes() for p in photo_files[:4]])
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(server.post, "/v1/predict", body, content_type) for _ in range(8)]
        deadline = time.monotonic() + 30
        while True:  # every request admitted (32 images queued behind an engine taking 2 at a time)
            with urllib.request.urlopen(server.url + "/metrics") as response:
                in_flight = re.search(r"^tlearn_queue_requests (\S+)", response.read().decode(), re.M).group(1)
            if float(in_flight) >= 8 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]
    assert [status for status, _ in results] == [200] * 8
    assert all(len(answer["predictions"]) == 4 for _, answer in results)
    assert server.stop() == 0
    # every request the server received was answered (on a fast machine the drain may find nothing left to do)
    answered = re.search(r"answered (\d+) of the (\d+) requests received", server.output())
    assert answered and answered.group(1) == answered.group(2) and int(answered.group(2)) >= 8


def test_serve_command_refuses_bad_folders_and_settings_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for args in ([str(tmp_path / "missing")], [str(tmp_path), "--max-batch", "0"]):
        run = subprocess.run([sys.executable, "-m", "tlearn.cli", "serve", *args], capture_output=True, text=True,
                             env=env, timeout=120)
        assert run.returncode == 2 and run.stderr.startswith("error:") and "Traceback" not in run.stderr
