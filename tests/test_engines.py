"""Engines and decode paths agree with the torch reference; exported files are cached; the pipeline streams.

Reference: the training-time path, PIL full decode + timm's eval transform + eager torch fp32.
Tolerances: fp32 engines give the same top-1 and class probabilities within 1e-3; the JPEG draft decode
(DCT-scaled, for images much larger than the input) gives the same top-1 and probabilities within 0.05.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SHARED
from tlearn.backbones import create_backbone, get_spec, weights_available
from tlearn.classifier import Classifier
from tlearn.data.decode import load_image
from tlearn.data.pipeline import pixel_batches
from tlearn.engines import EngineError, installed, open_engine, stream_pixels
from tlearn.features import feature_key
from tlearn.train import fit_head

DATASETS = SHARED
HYMENOPTERA = DATASETS / "hymenoptera" / "val"
FP32_PROB_TOLERANCE = 1e-3
DRAFT_PROB_TOLERANCE = 0.05

pytestmark = pytest.mark.skipif(not weights_available("efficientnet_lite0"), reason="no EfficientNet-Lite0 weights")


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    """EfficientNet-Lite0 with a linear head fitted on 24 + 8 hymenoptera images: a realistic ants/bees model."""
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"real dataset absent: {HYMENOPTERA}")
    backbone, _ = create_backbone("efficientnet_lite0")
    transform = get_spec("efficientnet_lite0").preprocessing.eval_transform()
    split = {name: [p for cls in ("ants", "bees") for p in sorted((DATASETS / "hymenoptera" / "train" / cls)
                                                                  .glob("*.jpg"))[offset::7][:count]]
             for name, offset, count in (("train", 0, 12), ("val", 3, 4))}
    with torch.inference_mode():
        xs = {name: backbone(torch.stack([transform(load_image(p)) for p in paths])).numpy()
              for name, paths in split.items()}
    ys = {name: np.repeat([0, 1], len(paths) // 2) for name, paths in split.items()}
    head = fit_head(xs["train"], ys["train"], xs["val"], ys["val"], 2).head
    return Classifier.from_head(backbone, head).eval()


@pytest.fixture(scope="module")
def images() -> list[Path]:
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"real dataset absent: {HYMENOPTERA}")
    return sorted(HYMENOPTERA.rglob("*.jpg"))[::20][:8]


def reference_proba(model: Classifier, paths: list[Path]) -> np.ndarray:
    transform = get_spec("efficientnet_lite0").preprocessing.eval_transform()
    with torch.inference_mode():
        return model(torch.stack([transform(load_image(p)) for p in paths])).softmax(-1).numpy()


def pipeline_proba(model: Classifier, paths: list[Path], engine, draft: bool = True) -> np.ndarray:
    preprocessing = get_spec("efficientnet_lite0").preprocessing
    batches = list(stream_pixels(paths, preprocessing, batch_size=3, workers=2, draft=draft))
    assert [i for b in batches for i in b.indices] == list(range(len(paths)))
    features = np.concatenate([engine(b.pixels) for b in batches])
    with torch.inference_mode():
        return model.classify_features(torch.from_numpy(features)).softmax(-1).numpy()


@pytest.mark.parametrize("name", ["torch", "onnx", "openvino"])
def test_fp32_engines_match_the_torch_reference(name, classifier, images, tmp_path):
    if not installed(name):
        pytest.skip(f"{name} not installed")
    preprocessing = get_spec("efficientnet_lite0").preprocessing
    engine = open_engine(classifier.backbone, preprocessing, tmp_path, name, "fp32")
    expected, got = reference_proba(classifier, images), pipeline_proba(classifier, images, engine)
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert np.abs(got - expected).max() <= FP32_PROB_TOLERANCE


def test_draft_decode_of_large_jpegs_matches_full_decode(classifier, images, tmp_path):
    large = []
    for path in images[:4]:
        image = load_image(path)
        target = tmp_path / f"{path.stem}-large.jpg"
        image.resize((image.width * 3, image.height * 3), Image.BICUBIC).save(target, quality=92)
        large.append(target)
    resize = get_spec("efficientnet_lite0").preprocessing.resize_size()
    drafted_size = min(load_image(large[0], (2 * resize, 2 * resize)).size)
    assert drafted_size < min(load_image(large[0]).size) / 1.5  # the draft decode did act
    engine = open_engine(classifier.backbone, get_spec("efficientnet_lite0").preprocessing, tmp_path, "torch")
    expected = reference_proba(classifier, large)
    full, drafted = (pipeline_proba(classifier, large, engine, draft) for draft in (False, True))
    assert np.abs(full - expected).max() <= FP32_PROB_TOLERANCE  # uint8 pipeline == timm's float transform
    assert (drafted.argmax(1) == expected.argmax(1)).all()
    assert np.abs(drafted - expected).max() <= DRAFT_PROB_TOLERANCE


@pytest.mark.skipif(not installed("onnx"), reason="onnxruntime not installed")
def test_exported_engine_is_cached_and_reused(classifier, tmp_path):
    preprocessing = get_spec("efficientnet_lite0").preprocessing
    open_engine(classifier.backbone, preprocessing, tmp_path, "onnx")
    exported = list(tmp_path.glob("*/model-fp32.onnx"))
    assert len(exported) == 1 and (exported[0].parent / "verified.json").exists()
    before = exported[0].stat().st_mtime_ns
    open_engine(classifier.backbone, preprocessing, tmp_path, "onnx")
    assert exported[0].stat().st_mtime_ns == before


def test_unsupported_precision_and_missing_calibration_are_clear_errors(classifier, tmp_path):
    preprocessing = get_spec("efficientnet_lite0").preprocessing
    with pytest.raises(EngineError, match="torch engine does not run int8"):
        open_engine(classifier.backbone, preprocessing, tmp_path, "torch", "int8")
    if installed("openvino"):
        with pytest.raises(EngineError, match="calibration images"):
            open_engine(classifier.backbone, preprocessing, tmp_path, "openvino", "int8")


@pytest.mark.skipif(not installed("openvino"), reason="openvino not installed")
def test_int8_calibrated_on_real_images_keeps_top1(classifier, images, tmp_path):
    preprocessing = get_spec("efficientnet_lite0").preprocessing
    train = sorted((HYMENOPTERA.parent / "train").rglob("*.jpg"))[::10][:16]
    calibration = lambda: (b.pixels for b in stream_pixels(train, preprocessing, 8))  # noqa: E731
    engine = open_engine(classifier.backbone, preprocessing, tmp_path, "openvino", "int8", calibration)
    expected, got = reference_proba(classifier, images), pipeline_proba(classifier, images, engine)
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.75  # int8's accuracy cost: bench/precision.py


def test_feature_key_separates_reduced_precisions():
    preprocessing = get_spec("efficientnet_lite0").preprocessing
    keys = {p: feature_key("arch", "sha", preprocessing, p) for p in ("fp32", "bf16", "int8")}
    assert keys["fp32"] == feature_key("arch", "sha", preprocessing) and len(set(keys.values())) == 3


def test_pipeline_keeps_order_reports_failures_and_bounds_work_in_flight(tmp_path, images):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    paths = [images[0], bad, images[1]] * 10
    decoded, lock = [], threading.Lock()

    def to_pixels(image):
        with lock:
            decoded.append(1)
        return np.zeros((3, 8, 8), np.uint8)

    stream = pixel_batches(paths, to_pixels, 8, batch_size=2, workers=2)
    first = next(stream)
    assert first.indices == [0] and first.errors[0][0] == 1 and "not an image" in first.errors[0][1]
    threading.Event().wait(0.5)  # let the workers run ahead as far as they are allowed
    assert len(decoded) <= 2 * 2 * 2 + 2  # at most 2 x workers batches of 2 beyond the one consumed
    rest = list(stream)
    assert [i for b in [first, *rest] for i in b.indices] == [i for i in range(30) if i % 3 != 1]
    assert [i for b in [first, *rest] for i, _ in b.errors] == list(range(1, 30, 3))


class _PidStamped:
    """to_pixels that writes the decoding process's id into the first four bytes (picklable, for worker processes)."""

    def __init__(self, preprocessing):
        self.preprocessing = preprocessing

    def __call__(self, image):
        pixels = self.preprocessing.to_pixels(image)
        pixels.reshape(-1)[:4] = np.frombuffer(np.uint32(os.getpid()).tobytes(), np.uint8)
        return pixels


def test_an_engine_on_a_gpu_gets_its_pixels_decoded_in_worker_processes(tmp_path, images):
    """The GPU path's decoding: the same pixels and failures as the threads give, in order, from other processes;
    an engine's wrappers (the mirror, the mean of views) ask for what the engine asks for."""
    from tlearn.engines import decode_processes
    from tlearn.engines.views import MeanOfViews, Mirrored

    preprocessing = get_spec("efficientnet_lite0").preprocessing
    bad, cut = tmp_path / "broken.jpg", tmp_path / "cut.jpg"
    bad.write_bytes(b"not a jpeg")
    cut.write_bytes(images[2].read_bytes()[:300])
    paths = [images[0], bad, images[1], cut, images[3]] * 4

    class OnGpu:
        decode_processes = True

        def __call__(self, pixels):
            return pixels

    assert decode_processes(MeanOfViews(OnGpu())) and decode_processes(Mirrored(OnGpu()))
    assert not decode_processes(lambda pixels: pixels) and not decode_processes(None)
    threaded = list(stream_pixels(paths, preprocessing, 4, workers=2))
    in_processes = list(stream_pixels(paths, preprocessing, 4, workers=2, engine=MeanOfViews(OnGpu())))
    assert [b.indices for b in in_processes] == [b.indices for b in threaded]
    assert [b.errors for b in in_processes] == [b.errors for b in threaded]
    assert [i for b in threaded for i, _ in b.errors] == [i for i in range(20) if i % 5 in (1, 3)]
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(in_processes, threaded))
    stamped = [b.pixels for b in pixel_batches(paths, _PidStamped(preprocessing), preprocessing.input_size, 4, 2,
                                               processes=True) if len(b.indices)]
    pids = {int(np.frombuffer(p.reshape(-1)[:4].tobytes(), np.uint32)[0]) for batch in stamped for p in batch}
    assert pids and os.getpid() not in pids


OPENVINO_RELEASE_ORDER = """
import os, signal, sys
from pathlib import Path
import onnx
from onnx import TensorProto, helper
from tlearn.engines.runtimes import OpenVinoEngine

graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
model = Path(sys.argv[1]) / "relu.onnx"
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
first, second = OpenVinoEngine(model), OpenVinoEngine(model)
del first  # released in the order they were made, as a Predictor's two engines are
del second
signal.signal(signal.SIGUSR1, lambda *_: print("handled", flush=True))
os.kill(os.getpid(), signal.SIGUSR1)
"""


@pytest.mark.skipif(not installed("openvino"), reason="OpenVINO is not installed")
def test_openvino_engines_released_in_any_order_leave_signal_handling_intact(tmp_path):
    """Each OpenVINO Core's CPU plugin swaps the thread's signal stack for its own and unmaps it when released: two
    engines on two Cores, released first-made-first, left the thread on unmapped pages, and the next signal Python
    handled (a DataLoader's SIGCHLD) was a SIGSEGV. Every engine shares the process's one Core."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", OPENVINO_RELEASE_ORDER, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "handled\n", (done.returncode, done.stderr[-2000:])
