"""The inference engines: one call, uint8 pixels (n, 3, H, W) in, float32 outputs out.

Normalisation is inside every engine (in torch for the reference, in the exported graph for the others), so all of
them see exactly the pixels the pipeline made.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tlearn.backbones import Preprocessing
from tlearn.engines import EngineError  # noqa: F401  (raised here, defined where it is light to import)


def default_threads() -> int:
    return max(1, os.cpu_count() or 1)


class PixelsToOutputs(nn.Module):
    """`model` behind the preprocessing's normalisation: the graph every engine runs."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing):
        super().__init__()
        self.model, self.preprocessing = model.eval(), preprocessing

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocessing.normalise(pixels))


class TorchEngine:
    """Eager torch, channels_last: the reference every other engine is checked against."""

    name = "torch"
    precisions = ("fp32", "bf16")

    def __init__(self, graph: PixelsToOutputs, precision: str = "fp32"):
        _check_precision(self, precision)
        keep_freed_memory()
        self.graph, self.precision = graph.eval().to(memory_format=torch.channels_last), precision

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=self.precision == "bf16"):
            x = self.graph.preprocessing.normalise(torch.from_numpy(pixels))
            return self.graph.model(x.contiguous(memory_format=torch.channels_last)).float().numpy()


class OnnxEngine:
    """onnxruntime, CPU, all graph optimisations; int8 runs the statically quantised (QDQ) model."""

    name = "onnx"
    precisions = ("fp32", "int8")

    def __init__(self, model_file: Path, precision: str = "fp32", threads: int | None = None):
        _check_precision(self, precision)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        self.input_name, self.precision = self.session.get_inputs()[0].name, precision

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(pixels)})[0]


class OpenVinoEngine:
    """OpenVINO on the CPU; bf16 is its inference-precision hint, int8 runs the quantised (QDQ) model.

    Compiled blobs are kept in `cache_dir`, so a second start skips the compilation.
    """

    name = "openvino"
    precisions = ("fp32", "bf16", "int8")

    def __init__(self, model_file: Path, precision: str = "fp32", threads: int | None = None,
                 cache_dir: Path | None = None):
        _check_precision(self, precision)
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                  "INFERENCE_NUM_THREADS": threads or default_threads(), "PERFORMANCE_HINT": "LATENCY"}
        if cache_dir is not None:
            config["CACHE_DIR"] = str(cache_dir)
        self.compiled = ov.Core().compile_model(str(model_file), "CPU", config)
        self.request, self.precision = self.compiled.create_infer_request(), precision

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        result = self.request.infer([np.ascontiguousarray(pixels)])
        return np.array(result[self.compiled.output(0)], dtype=np.float32)


def _check_precision(engine, precision: str) -> None:
    if precision not in engine.precisions:
        raise EngineError(f"the {engine.name} engine does not run {precision}; it runs "
                          f"{', '.join(engine.precisions)} (openvino runs fp32, bf16 and int8)")


def keep_freed_memory() -> None:
    """Stop glibc from unmapping and re-faulting torch's activation buffers on every forward pass.

    Equivalent to MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set before start (up to 4x faster at large
    batches); an LD_PRELOADed allocator would do it too but makes OpenVINO abort.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value on 64-bit
    libc.mallopt(m_trim_threshold, 1 << 30)
