"""The page `tlearn serve` shows at /, in a real headless Chromium: pick two photos, see labels and bars."""
from __future__ import annotations

import base64
import io
import json
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")

from chromium_page import _wait_for_event, devtools_page  # noqa: E402
from served_process import RealServer  # noqa: E402

RESULTS_JS = """JSON.stringify(Array.from(document.querySelectorAll('.result')).map(r => ({
  verdict: r.querySelector('.verdict').textContent,
  name: r.querySelector('.name').textContent,
  labels: Array.from(r.querySelectorAll('.row .label')).map(l => l.textContent),
  bars: Array.from(r.querySelectorAll('.bar')).map(b => b.getBoundingClientRect().width),
  thumbnail: r.querySelector('img').naturalWidth})))"""
CARD_JS = "document.getElementById('card').textContent"
HEAT_JS = """JSON.stringify(Array.from(document.querySelectorAll('.result img')).map(i => ({
  src: i.src.slice(0, 20), width: i.naturalWidth, title: i.title})))"""


@pytest.fixture(scope="module")
def model_dir(demo_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("page") / "demo-model"
    demo_model.save(path)
    return path


def wait_for(call, expression: str, done, timeout: float = 60):
    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        value = json.loads(call("Runtime.evaluate", expression=expression)["result"].get("value") or "null")
        if done(value):
            return value
        time.sleep(0.2)
    raise AssertionError(f"page never reached the expected state; last: {value}")


@pytest.mark.slow
def test_page_classifies_two_picked_photos(model_dir, demo_data, tmp_path):
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("chromium is not installed (make install-browser / apt-get install chromium)")
    photos = [sorted((demo_data / "test" / cls).glob("*.png"))[0] for cls in ("brick", "grass")]
    big = tmp_path / "big-grass.jpg"  # a large photo: the page shrinks it before upload
    Image.open(photos[1]).convert("RGB").resize((2400, 1800)).save(big, quality=90)
    server = RealServer(model_dir)
    try:
        with urllib.request.urlopen(f"{server.url}/v1/models/{model_dir.name}") as response:
            classes = json.load(response)["card"]["classes"]
        with devtools_page(binary) as (call, ws):
            call("Page.navigate", url=server.url + "/")
            _wait_for_event(ws, "Page.loadEventFired", 60)
            card = wait_for(call, f"JSON.stringify({CARD_JS})", lambda text: text and "brick" in text)
            assert "efficientnet" in card and "accuracy" in card
            root = call("DOM.getDocument")["root"]["nodeId"]
            picker = call("DOM.querySelector", nodeId=root, selector="#files")["nodeId"]
            call("DOM.setFileInputFiles", nodeId=picker, files=[str(photos[0]), str(big)])
            results = wait_for(call, RESULTS_JS, lambda rows: rows and len(rows) == 2 and all(
                r["labels"] for r in rows))
            call("Runtime.evaluate", expression="document.getElementById('heat').click()")
            heat = wait_for(call, HEAT_JS, lambda imgs: imgs and all(
                i["src"].startswith("data:image/png") and i["width"] > 0 for i in imgs))
            call("Runtime.evaluate", expression="document.getElementById('heat').click()")
            wait_for(call, HEAT_JS, lambda imgs: imgs and all(i["src"].startswith("blob:") for i in imgs))
            shot = call("Page.captureScreenshot", format="png")
    finally:
        server.stop()
    for row in results:
        assert len(row["labels"]) == 3 and set(row["labels"]) <= set(classes)
        assert row["bars"][0] > 0 and row["bars"] == sorted(row["bars"], reverse=True)
        assert row["verdict"].split(" ")[0] in (*classes, "uncertain")
        assert row["thumbnail"] > 0
    assert {r["verdict"] for r in results} == {"brick", "grass"}
    assert sorted(i["title"].split(" (")[0] for i in heat) == ["heat map of brick", "heat map of grass"]
    shrunk = {r["name"] for r in results if "sent as" in r["name"]}
    assert shrunk == {"big-grass.jpg (2400×1800, sent as 1024×768)"}, "the browser did not shrink the big photo"
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB"))
    (tmp_path / "page.png").write_bytes(base64.b64decode(shot["data"]))
    assert image.shape[0] > 400 and image.std() > 20, "the screenshot is blank"
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 500, "the screenshot shows no photos"
