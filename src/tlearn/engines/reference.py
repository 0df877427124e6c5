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

    def __init__(self, graph: PixelsToOutputs, precision: str = "fp32"):
        check_precision(self, precision)
        keep_freed_memory()
        self.graph, self.precision = graph.eval().to(memory_format=torch.channels_last), precision

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=self.precision == "bf16"):
            x = self.graph.preprocessing.normalise(torch.from_numpy(pixels))
            return self.graph.model(x.contiguous(memory_format=torch.channels_last)).float().numpy()
