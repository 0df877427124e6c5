"""The feature-map engine: the backbone up to its last spatial feature map, before global average pooling.

uint8 pixels (n, 3, H, W) in, float32 maps (n, C, h, w) out; their mean over (h, w) is the pooled features the
backbone engine gives, so a class activation map is the head's class weights applied at each place of the map.

A second file beside the backbone's engine rather than a second output of it: the backbone's file is also the
feature cache's engine (its key, its verdicts, its int8 quantisation), which this leaves untouched. It is verified
without torch: its maps, pooled, must give the eager-torch outputs the backbone engine was verified against.

Where the backbone's verified fp32 ONNX file ends in a global average pool (and a flatten), the feature-map file is
that graph cut before the pool (onnx.utils.extract_model: ~0.15 s, no torch); otherwise it is exported from the
torch network (~0.5 s).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from tlearn.engines import (
    FASTEST_FIRST,
    FP32_MAX_ABS_DIFF,
    REDUCED_MIN_COSINE,
    EngineError,
    _remember,
    installed,
    intact,
    read_reference,
)

if TYPE_CHECKING:
    from torch import nn

    from tlearn.backbones import Preprocessing

FEATURE_MAP_FILE = "feature-map.onnx"
NO_MAP_FILE = "feature-map.none"  # written where a backbone has no map, so that a re-train does not build it to ask


def exported_feature_map(folder: Path) -> Path | None | bool:
    """The feature-map file exported in `folder`; False when the backbone has none; None when not asked yet."""
    if intact(Path(folder) / FEATURE_MAP_FILE):
        return Path(folder) / FEATURE_MAP_FILE
    return False if intact(Path(folder) / NO_MAP_FILE) else None


def pooled(maps: np.ndarray) -> np.ndarray:
    """The pooled features of feature maps (n, C, h, w): their mean over the places (as timm's avg pool)."""
    return maps.mean(axis=(2, 3), dtype=np.float64).astype(np.float32)


def known_or_cut(folder: Path, fp32_file: Path | None) -> Path | None | bool:
    """exported_feature_map(`folder`), the map first cut from the fp32 backbone graph `fp32_file` when none was made
    yet (derive_feature_map); None when only the torch network can tell (export_feature_map)."""
    known = exported_feature_map(folder)
    if known is None and fp32_file is not None:
        derive_feature_map(fp32_file, folder)
        known = exported_feature_map(folder)
    return known


def derive_feature_map(model_file: Path, folder: Path) -> Path | None:
    """Write `folder`/feature-map.onnx cut from the fp32 backbone graph `model_file` before its global average
    pool, and check it against `folder`'s reference outputs; None when the graph does not end that way, the cut
    file disagrees, or its map has a single place (VGG: its fully connected layers run as convolutions down to
    1 x 1), for the caller to export the map from torch (or find there is none) instead."""
    from tlearn.engines import REFERENCE_FILE
    from tlearn.engines.runtimes import OnnxEngine
    from tlearn.files import write_atomically

    path = Path(folder) / FEATURE_MAP_FILE
    if intact(path):
        return path
    try:
        import onnx
    except ImportError:  # the base install: no graph surgery here
        return None
    try:
        graph = onnx.load(str(model_file), load_external_data=False).graph
    except Exception:  # not a file onnx reads: the torch export decides
        return None
    maps = _pooled_input(graph)
    if maps is None:
        return None
    write_atomically(path, lambda tmp: onnx.utils.extract_model(str(model_file), tmp, [graph.input[0].name], [maps]))
    verdict = check(OnnxEngine(path), Path(folder) / REFERENCE_FILE)
    if not verdict["ok"] or verdict["places"] <= 1:
        path.unlink()
        if verdict["ok"]:  # no map to speak of: recorded, as the torch export records it, so nobody asks again
            _no_map(folder, "the map before the pooling has a single place (fully connected layers as convolutions)")
        return None
    _remember(path)
    return path


def _no_map(folder: Path, why: str) -> None:
    (Path(folder) / NO_MAP_FILE).write_text(why + "\n")
    _remember(Path(folder) / NO_MAP_FILE)


def _pooled_input(graph) -> str | None:
    """The name of the 4-d tensor the graph's only output is the global average pool of (GlobalAveragePool, or
    ReduceMean over axes 2 and 3, then an optional Flatten), or None."""
    from onnx import numpy_helper

    if len(graph.output) != 1:
        return None
    producer = {output: node for node in graph.node for output in node.output}
    node = producer.get(graph.output[0].name)
    if node is not None and node.op_type in ("Flatten", "Squeeze", "Reshape"):
        node = producer.get(node.input[0])
    if node is None:
        return None
    if node.op_type == "GlobalAveragePool":
        return node.input[0]
    if node.op_type == "ReduceMean":
        axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
        if axes is None and len(node.input) > 1:  # opset 18: axes is an input, a constant of the graph
            constant = producer.get(node.input[1])
            values = next((a.t for a in constant.attribute if a.name == "value"), None) if constant else None
            axes = numpy_helper.to_array(values).tolist() if values is not None else None
        if axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]:
            return node.input[0]
    return None


def export_feature_map(backbone: nn.Module, preprocessing: Preprocessing, folder: Path) -> Path | None:
    """Write `folder`/feature-map.onnx for `backbone` (a timm network without classifier) unless it is there, and
    check it against `folder`'s reference outputs. None for a backbone whose pooled features are not the mean of
    a spatial map (VGG: fully connected layers after the last convolution)."""
    import torch
    from torch import nn

    from tlearn.engines import REFERENCE_FILE
    from tlearn.engines.export import export_onnx
    from tlearn.engines.reference import PixelsToOutputs
    from tlearn.engines.runtimes import OnnxEngine

    path = Path(folder) / FEATURE_MAP_FILE
    if intact(path):
        return path
    if not isinstance(getattr(backbone, "pre_logits", nn.Identity()), nn.Identity):
        _no_map(folder, "fully connected layers after the last convolution")
        return None

    class FeatureMap(nn.Module):
        def __init__(self, network: nn.Module):
            super().__init__()
            self.network = network

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.network.forward_features(pixels)

    export_onnx(PixelsToOutputs(FeatureMap(backbone), preprocessing), path)
    verdict = check(OnnxEngine(path), Path(folder) / REFERENCE_FILE)
    if not verdict["ok"]:
        path.unlink()
        return None
    _remember(path)
    return path


def check(engine: Callable[[np.ndarray], np.ndarray], reference_file: Path) -> dict:
    """Whether `engine`'s maps, pooled, agree with the eager-torch pooled features in `reference_file`."""
    pixels, expected = read_reference(reference_file)
    maps = engine(pixels)
    if maps.ndim != 4 or maps.shape[:2] != expected.shape:
        return {"ok": False, "places": 0,
                "detail": f"maps of shape {maps.shape} for features of shape {expected.shape}"}
    outputs = pooled(maps)
    diff = float(np.abs(outputs - expected).max())
    cosine = float(min(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)
                       for a, b in zip(outputs, expected)))
    precision = getattr(engine, "precision", "fp32")
    ok = diff <= FP32_MAX_ABS_DIFF if precision == "fp32" else cosine >= REDUCED_MIN_COSINE
    return {"ok": bool(ok), "places": int(maps.shape[2] * maps.shape[3]),
            "detail": f"pooled maps differ by up to {diff:.2e}, worst cosine {cosine:.4f}"}


def open_feature_map(model_file: Path, reference_file: Path, engine: str = "auto", precision: str = "fp32",
                     compile_cache: Path | None = None):
    """The fastest installed runtime (or `engine`) running the feature-map file whose pooled maps agree with the
    reference; int8 models run it at fp32 (the file is not quantised). EngineError says why none does."""
    from tlearn.engines.runtimes import OnnxEngine, OpenVinoEngine

    precision = "fp32" if precision == "int8" else precision
    reasons = []
    for name in (FASTEST_FIRST if engine in ("auto", "torch") else (engine,)):
        if name == "torch" or not installed(name):
            continue
        try:
            opened = (OnnxEngine(model_file, precision) if name == "onnx"
                      else OpenVinoEngine(model_file, precision, None, compile_cache))
        except Exception as exc:  # a damaged file or a runtime refusing it: try the next one
            reasons.append(f"{name}: cannot load {Path(model_file).name} ({type(exc).__name__}: {exc})")
            continue
        verdict = check(opened, reference_file)
        if verdict["ok"]:
            return opened
        reasons.append(f"{name}: {verdict['detail']}")
    raise EngineError(f"no engine runs {Path(model_file).name} at {precision} here ({'; '.join(reasons)})")
