"""ONNX export of an engine graph (uint8 pixels in), its int8 quantisation calibrated on real images, and the
export of a whole classifier as one self-contained file, verified against torch before it is put in place."""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from tlearn.backbones import Preprocessing
from tlearn.engines import EngineError
from tlearn.engines.reference import PixelsToOutputs, TorchEngine
from tlearn.engines.runtimes import OnnxEngine
from tlearn.files import temporary_beside

INPUT_NAME, OUTPUT_NAME, PROBABILITIES = "pixels", "outputs", "probabilities"
# An exported classifier must agree with eager torch fp32 on real images, in class probabilities: fp32 to 1e-3 with
# every top-1 the same. int8 within looser bounds: an image near the decision boundary may flip (measured with
# onnxruntime on 64 hymenoptera val images: 1 flip, max abs difference 0.23, mean 0.017), but no confident
# prediction may turn over and the bulk must stay close; its accuracy cost: bench/README.md "Precision".
EXPORT_TOLERANCE = {"fp32": {"max_abs_diff": 1e-3, "mean_abs_diff": 1e-3, "top1_agreement": 1.0},
                    "int8": {"max_abs_diff": 0.5, "mean_abs_diff": 0.05, "top1_agreement": 0.95}}


def export_onnx(graph: PixelsToOutputs, path: Path, output_name: str = OUTPUT_NAME) -> Path:
    """Write `graph` as ONNX with a dynamic batch dimension (written to a temporary name, then renamed)."""
    size = graph.preprocessing.input_size
    example = torch.zeros((2, 3, size, size), dtype=torch.uint8)
    with temporary_beside(path) as tmp, warnings.catch_warnings(), torch.inference_mode():
        # The TorchScript exporter handles this model in seconds and needs no extra package; it is deprecated,
        # not removed, in torch 2.14.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph.eval(), (example,), tmp, input_names=[INPUT_NAME], output_names=[output_name],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
                          opset_version=17, dynamo=False)
        os.replace(tmp, path)
    return path


def quantise_int8(fp32_file: Path, path: Path, calibration: Iterable[np.ndarray], only_scope: str = "") -> Path:
    """Static int8 (QDQ, per-channel weights) quantisation of `fp32_file`, ranges calibrated on `calibration`.

    `calibration` yields uint8 pixel batches of real training images; onnxruntime and OpenVINO both run the result.
    With `only_scope`, only nodes whose name contains it are quantised (e.g. the backbone, not the head).
    """
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quant_pre_process,
            quantize_static,
        )
    except ImportError:
        raise EngineError("int8 needs onnxruntime: pip install 'onnxruntime>=1.20'") from None

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch)}

    with temporary_beside(path) as prepared, temporary_beside(path) as tmp:
        quant_pre_process(str(fp32_file), prepared, skip_symbolic_shape=True)
        import onnx  # only here and in _set_properties: a cached re-train never needs it

        excluded = [node.name for node in onnx.load(prepared).graph.node if only_scope not in node.name]
        quantize_static(prepared, tmp, Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
        os.replace(tmp, path)
    return path


class ClassProbabilities(nn.Module):
    """A classifier (normalised pixels -> logits) followed by softmax over the classes."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(pixels).softmax(-1)


@dataclass
class ExportCheck:
    """How an exported classifier compares with eager torch fp32 on real images."""

    path: str
    precision: str
    images: int
    image_source: str
    max_abs_diff: float  # of class probabilities
    mean_abs_diff: float
    top1_agreement: float
    tolerance: dict

    @property
    def ok(self) -> bool:
        return (self.max_abs_diff <= self.tolerance["max_abs_diff"]
                and self.mean_abs_diff <= self.tolerance["mean_abs_diff"]
                and self.top1_agreement >= self.tolerance["top1_agreement"])

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def export_classifier(classifier: nn.Module, preprocessing: Preprocessing, path: Path, properties: dict[str, str],
                      check_pixels: np.ndarray, image_source: str,
                      calibration: Iterable[np.ndarray] | None = None) -> ExportCheck:
    """Write `classifier` + softmax (uint8 pixels in, class probabilities out) as one ONNX file at `path`.

    With `calibration` (uint8 batches of training images) the backbone is quantised to int8; the head stays fp32.
    The file is run with onnxruntime on `check_pixels` and compared with eager torch fp32 before it is moved into
    place; outside EXPORT_TOLERANCE it is not written and EngineError says by how much. `properties` and the check
    go into the file's metadata_props.
    """
    precision = "fp32" if calibration is None else "int8"
    graph = PixelsToOutputs(ClassProbabilities(classifier), preprocessing)
    path = Path(path)
    with temporary_beside(path) as fp32_file, temporary_beside(path) as int8_file:
        export_onnx(graph, Path(fp32_file), PROBABILITIES)
        candidate = fp32_file if calibration is None else quantise_int8(
            Path(fp32_file), Path(int8_file), calibration, only_scope="/backbone/")
        exported = OnnxEngine(Path(candidate), precision)(check_pixels)
        reference = TorchEngine(graph, "fp32")(check_pixels)
        difference = np.abs(exported - reference)
        check = ExportCheck(str(path), precision, len(check_pixels), image_source, float(difference.max()),
                            float(difference.mean()), float((exported.argmax(1) == reference.argmax(1)).mean()),
                            EXPORT_TOLERANCE[precision])
        if not check.ok:
            raise EngineError(f"the exported {precision} model disagrees with torch on {image_source}: "
                              f"probabilities differ by up to {check.max_abs_diff:.2e} (mean "
                              f"{check.mean_abs_diff:.2e}), top-1 agreement {check.top1_agreement:.1%} "
                              f"(tolerance: {check.tolerance}); {path} was not written")
        _set_properties(Path(candidate), {**properties, "verification": json.dumps(check.to_dict())})
        os.replace(candidate, path)
    return check


def _set_properties(path: Path, properties: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, properties)
    onnx.save(model, str(path))


def onnx_to_openvino(onnx_file: Path, path: Path, properties: dict[str, str], reference: np.ndarray,
                     check_pixels: np.ndarray, image_source: str) -> ExportCheck:
    """Convert a verified fp32 ONNX export into OpenVINO IR at `path` (.xml, with its .bin beside it), run it
    with OpenVINO on `check_pixels` and compare with `reference` (eager torch's probabilities); outside
    EXPORT_TOLERANCE nothing is written. Both files are moved into place only once the check passed."""
    import shutil
    import tempfile

    import openvino as ov

    from tlearn.engines.runtimes import OpenVinoEngine

    path = Path(path)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp"))
    try:
        model = ov.convert_model(str(onnx_file))
        for key, value in properties.items():
            model.set_rt_info(value, ["tlearn", key])
        xml = staging / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        exported = OpenVinoEngine(xml, "fp32")(check_pixels)
        difference = np.abs(exported - reference)
        check = ExportCheck(str(path), "fp32", len(check_pixels), image_source, float(difference.max()),
                            float(difference.mean()), float((exported.argmax(1) == reference.argmax(1)).mean()),
                            EXPORT_TOLERANCE["fp32"])
        if not check.ok:
            raise EngineError(f"the OpenVINO model disagrees with torch on {image_source}: probabilities differ by "
                              f"up to {check.max_abs_diff:.2e} (mean {check.mean_abs_diff:.2e}), top-1 agreement "
                              f"{check.top1_agreement:.1%}; {path} was not written")
        os.replace(xml.with_suffix(".bin"), path.with_suffix(".bin"))  # the weights first: an .xml is never
        os.replace(xml, path)                                           # beside another model's .bin
        return check
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def torch_probabilities(classifier: nn.Module, preprocessing: Preprocessing, pixels: np.ndarray) -> np.ndarray:
    """Eager torch fp32's calibrated probabilities of uint8 `pixels`: what an export is compared with."""
    return TorchEngine(PixelsToOutputs(ClassProbabilities(classifier), preprocessing), "fp32")(pixels)
