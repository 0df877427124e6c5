"""ONNX export of an engine graph (uint8 pixels in), and its int8 quantisation calibrated on real images."""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from tlearn.engines.runtimes import EngineError, PixelsToOutputs

INPUT_NAME, OUTPUT_NAME = "pixels", "outputs"


def export_onnx(graph: PixelsToOutputs, path: Path) -> Path:
    """Write `graph` as ONNX with a dynamic batch dimension (written to a temporary name, then renamed)."""
    size = graph.preprocessing.input_size
    example = torch.zeros((2, 3, size, size), dtype=torch.uint8)
    with _temporary_beside(path) as tmp, warnings.catch_warnings(), torch.inference_mode():
        # The TorchScript exporter handles this model in seconds and needs no extra package; it is deprecated,
        # not removed, in torch 2.14.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph.eval(), (example,), tmp, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=17, dynamo=False)
        os.replace(tmp, path)
    return path


def quantise_int8(fp32_file: Path, path: Path, calibration: Iterable[np.ndarray]) -> Path:
    """Static int8 (QDQ, per-channel weights) quantisation of `fp32_file`, ranges calibrated on `calibration`.

    `calibration` yields uint8 pixel batches of real training images; onnxruntime and OpenVINO both run the result.
    """
    try:
        from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                              quantize_static)
    except ImportError:
        raise EngineError("int8 needs onnxruntime: pip install 'onnxruntime>=1.20'") from None

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch)}

    with _temporary_beside(path) as prepared, _temporary_beside(path) as tmp:
        quant_pre_process(str(fp32_file), prepared, skip_symbolic_shape=True)
        quantize_static(prepared, tmp, Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        os.replace(tmp, path)
    return path


class _temporary_beside:
    """A temporary file name next to `path` (same file system, so the final rename is atomic), removed on exit."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __enter__(self) -> str:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(self.tmp, 0o644)  # mkstemp's 0600 would hide a shared model folder's engines from other users
        return self.tmp

    def __exit__(self, *exc) -> None:
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)
