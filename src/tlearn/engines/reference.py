"""The reference engine: the backbone in eager torch behind the preprocessing's normalisation.

Every other engine is exported from `PixelsToOutputs` and verified against `TorchEngine` before it is used.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tlearn.backbones import Preprocessing
from tlearn.engines.runtimes import check_precision, keep_freed_memory


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

    def __init__(self, graph: PixelsToOutputs, precision: str = "fp32", device: torch.device | None = None):
        check_precision(self, precision)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        else:  # a copy on the device: the network itself stays on the CPU (export, verification, the bundle)
            import copy

            graph = copy.deepcopy(graph).to(self.device)
        self.graph, self.precision = graph.eval().to(memory_format=torch.channels_last), precision
        # on a GPU the cores only feed it: decoding in worker processes, not threads queuing on the GIL
        self.decode_processes = self.device.type != "cpu"

    def _exact_fp32(self):
        """fp32 on a CUDA GPU means fp32: no TF32 convolutions, so its features match the CPU engines' (the feature
        cache holds both); cuDNN's other settings as they are."""
        import contextlib

        if self.device.type != "cuda" or self.precision != "fp32":
            return contextlib.nullcontext()
        cudnn = torch.backends.cudnn
        return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                           allow_tf32=False)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        kind = self.device.type if self.device.type in ("cpu", "cuda", "mps") else "cpu"
        with torch.inference_mode(), torch.autocast(kind, torch.bfloat16, enabled=self.precision == "bf16"), \
                self._exact_fp32():
            x = torch.from_numpy(pixels)
            if self.device.type != "cpu":  # uint8 over the bus (4x less than floats), normalised on the device
                x = x.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else \
                    x.to(self.device)
            x = self.graph.preprocessing.normalise(x)
            return self.graph.model(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
