"""`tlearn export`: one ONNX file, pixels in, calibrated probabilities out, that agrees with the torch model.

The file is run with onnxruntime on real hymenoptera images preprocessed from its own metadata only (PIL resize
and centre crop, no tlearn code), and compared with tlearn.load(...).predict_proba. Tolerances: fp32 within 1e-3
with the same top-1; int8 (calibrated on the training images) within the looser bounds stated in
tlearn.engines.export.EXPORT_TOLERANCE.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

import tlearn
from tlearn.backbones import weights_available
from tlearn.cli import app
from tlearn.engines import EngineError
from tlearn.engines import export as export_module

ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.skipif(not weights_available("efficientnet_lite0"), reason="no EfficientNet-Lite0 weights")
runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(hymenoptera_model) -> Path:
    return hymenoptera_model


@pytest.fixture(scope="module")
def images(hymenoptera_small) -> list[Path]:
    return sorted((hymenoptera_small / "val").rglob("*.jpg"))


@pytest.fixture(scope="module")
def exported(model_dir) -> tuple[Path, str]:
    result = runner.invoke(app, ["export", str(model_dir)])
    assert result.exit_code == 0, result.output
    return model_dir / "model.onnx", result.output


def run_onnx_file(path: Path, images: list[Path]) -> tuple[np.ndarray, dict]:
    """Probabilities from the ONNX file alone: preprocessing as its metadata describes, onnxruntime forward."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    (probabilities,) = session.run(["probabilities"], {"pixels": metadata_pixels(props, images)})
    return probabilities, props


def metadata_pixels(props: dict, images: list[Path]) -> np.ndarray:
    """uint8 (n, 3, size, size) of `images`, preprocessed as an export's metadata describes, with PIL alone."""
    prep = json.loads(props["preprocessing"])
    size, short = prep["input_size"], prep["resize_shorter_side"]
    assert prep["interpolation"] == "bicubic" and prep["crop"] == "centre"
    batch = []
    for path_ in images:
        image = Image.open(path_).convert("RGB")
        scale = short / min(image.size)
        width, height = (short, int(scale * image.height)) if image.width <= image.height else \
            (int(scale * image.width), short)
        image = image.resize((width, height), Image.BICUBIC)
        left, top = int(round((width - size) / 2)), int(round((height - size) / 2))
        batch.append(np.asarray(image.crop((left, top, left + size, top + size))).transpose(2, 0, 1))
    return np.stack(batch)


def test_exported_file_alone_matches_predict_proba(exported, model_dir, images):
    path, output = exported
    got, props = run_onnx_file(path, images)
    expected = tlearn.load(model_dir, progress=False).predict_proba(images)
    assert json.loads(props["classes"]) == ["ants", "bees"] and props["precision"] == "fp32"
    assert "calibrated class probabilities" in props["output"]
    assert float(props["temperature"]) == json.loads((model_dir / "config.json").read_text())["temperature"]
    assert np.allclose(got.sum(1), 1, atol=1e-5)
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert np.abs(got - expected).max() <= 1e-3
    verification = json.loads(props["verification"])
    assert verification["ok"] and verification["images"] == len(images)
    assert "top-1 agreement 100.0%" in " ".join(output.split())


def test_openvino_export_alone_matches_predict_proba_and_refuses_a_users_file(model_dir, images, tmp_path):
    ov = pytest.importorskip("openvino")
    users = tmp_path / "notes.xml"
    users.write_text("<mine/>")
    refused = runner.invoke(app, ["export", str(model_dir), "--format", "openvino", "--out", str(users)])
    assert refused.exit_code == 2 and "not an OpenVINO model that tlearn exported" in refused.output
    assert users.read_text() == "<mine/>" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.xml"]
    wrong = runner.invoke(app, ["export", str(model_dir), "--format", "openvino", "--out", str(tmp_path / "m.onnx")])
    assert wrong.exit_code == 2 and ".xml file" in wrong.output

    result = runner.invoke(app, ["export", str(model_dir), "--format", "openvino", "--out", str(tmp_path / "m.xml")])
    assert result.exit_code == 0, result.output
    assert "verified with OpenVINO against torch" in " ".join(result.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml", "notes.xml"]  # no temporary left
    model = ov.Core().read_model(str(tmp_path / "m.xml"))  # OpenVINO alone: no tlearn code below
    props = {key: model.get_rt_info(["tlearn", key]).value for key in ("classes", "preprocessing", "precision")}
    assert json.loads(props["classes"]) == ["ants", "bees"] and props["precision"] == "fp32"
    # f32 asked for: on a CPU with bf16 (AVX-512 bf16, AMX) OpenVINO's default is bf16, ~1e-2 away
    got = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(
        metadata_pixels(props, images))[0]
    expected = tlearn.load(model_dir, progress=False).predict_proba(images)
    assert (got.argmax(1) == expected.argmax(1)).all() and np.abs(got - expected).max() <= 1e-3
    again = runner.invoke(app, ["export", str(model_dir), "--format", "openvino", "--out", str(tmp_path / "m.xml")])
    assert again.exit_code == 0, again.output  # its own earlier export is replaced


def test_export_outside_tolerance_writes_nothing(model_dir, monkeypatch, tmp_path):
    impossible = {"fp32": {"max_abs_diff": -1.0, "mean_abs_diff": 1.0, "top1_agreement": 0.0}}
    monkeypatch.setattr(export_module, "EXPORT_TOLERANCE", impossible)
    with pytest.raises(EngineError, match="disagrees with torch.*was not written"):
        tlearn.load(model_dir, progress=False).export(tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary


def test_int8_export_is_quantised_and_close(model_dir, images, tmp_path):
    check = tlearn.load(model_dir, progress=False).export(tmp_path / "model-int8.onnx", int8=True)
    assert check.ok and check.precision == "int8"
    got, props = run_onnx_file(tmp_path / "model-int8.onnx", images)
    expected = tlearn.load(model_dir, progress=False).predict_proba(images)
    ops = {node.op_type for node in onnx.load(tmp_path / "model-int8.onnx").graph.node}
    assert props["precision"] == "int8" and "QuantizeLinear" in ops
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.75
    assert np.abs(got - expected).mean() <= 0.05


def test_int8_export_needs_the_training_images(model_dir, tmp_path):
    moved = shutil.copytree(model_dir, tmp_path / "model")
    config = json.loads((moved / "config.json").read_text())
    config["extra"]["data_checks"]["root"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["export", str(moved), "--int8"])
    assert result.exit_code == 2 and "calibrates on the model's training images" in result.output
    assert not (moved / "model-int8.onnx").exists()


def test_readme_reference_preprocessing_reproduces_tlearn(exported, model_dir, images, tmp_path):
    """The README's plain Pillow + numpy preprocessing, run as written, gives tlearn's probabilities to 1e-5."""
    import re
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"<!-- reference-preprocessing -->\n```python\n(.*?)```", readme, re.S).group(1)
    script = tmp_path / "reference.py"
    script.write_text(code)
    path, _ = exported
    from conftest import shared_dataset

    # and the largest photos of the set, where tlearn decodes the JPEG at a reduced scale first
    big = sorted(shared_dataset("hymenoptera").rglob("*.jpg"), key=lambda p: p.stat().st_size)[-3:]
    images = [*images, *big]
    assert max(Image.open(p).width for p in big) > 4 * 256
    predictor = tlearn.Predictor.load(model_dir)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    tlearn_pixels = np.stack([predictor.to_pixels(image) for image in images])  # tlearn's own pipeline
    (expected,) = session.run(["probabilities"], {"pixels": tlearn_pixels})
    for image, row in zip(images, expected):
        done = subprocess.run([sys.executable, str(script), str(path), str(image)], capture_output=True, text=True,
                              check=True)
        label, score = done.stdout.split()
        assert label == classes[int(row.argmax())]
        assert abs(float(score) - float(row.max())) <= 1e-5
