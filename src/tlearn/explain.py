"""Class activation maps, torch-free: where in an image the evidence for a class lies.

The head is linear on the L2-normalised mean of the backbone's last spatial feature map F (C, h, w):
logit_c = w_c . mean_ij F_ij / ||mean F|| + b_c = sum_ij w_c . F_ij / (h w ||mean F||) + b_c. Each place's term is
its share of the class's logit (CAM, Zhou et al. 2016, exact here); the feature-map engine gives F, numpy the rest.
A head with the ImageNet prior beside the features is split the same way to first order (`place_weights`).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from tlearn.bundle import Bundle
from tlearn.engines.views import mirror
from tlearn.errors import BundleError, InvalidParameter

if TYPE_CHECKING:
    from tlearn.predict import ImageInput, Predictor
    from tlearn.train.head import LinearHead

COLOUR_MAP = "jet"  # what matplotlib users know from CAM figures
OVERLAY_ALPHA = 0.45  # the heat's weight over the photo
PNG_TAG = "tlearn-explain"  # in every overlay written: a later run may replace its own files, never a user's


@dataclass(frozen=True)
class Explanation:
    """Where the evidence for one class lies in one image."""

    source: str  # the file's path, or "<image N>"
    label: str  # the class explained
    probability: float  # its calibrated probability
    top_label: str  # the model's top-1 class (the class explained unless another was named)
    grid: np.ndarray  # (h, w) float32: each place's share of the class's calibrated logit (they sum to logit - bias)
    size: tuple[int, int]  # (width, height) of the image
    box: tuple[int, int, int, int]  # (left, top, right, bottom): the centre crop the model saw, in image pixels

    @property
    def heat(self) -> np.ndarray:
        """(height, width) float32 in [0, 1] at the image's size: the grid upsampled (bilinear) over the crop,
        scaled from its lowest to its highest place; 0 outside the crop, which the model did not see."""
        left, top, right, bottom = self.box
        heat = np.zeros(self.size[::-1], np.float32)
        heat[top:bottom, left:right] = scaled(upsample(self.grid, (right - left, bottom - top)))
        return heat

    def to_dict(self) -> dict:
        return {"source": self.source, "label": self.label, "probability": self.probability,
                "top_label": self.top_label, "size": list(self.size), "box": list(self.box),
                "grid": np.round(self.grid.astype(np.float64), 6).tolist()}


def open_feature_map(bundle: Bundle, engine: str, precision: str):
    """The bundle's verified feature-map engine. A model folder without one (written by an older tlearn) gets one
    in the cache folder: cut from its fp32 engine graph (the onnx package), else exported from torch when the train
    extra is installed; otherwise BundleError says what to do."""
    from tlearn.engines import state_key
    from tlearn.engines.feature_map import export_feature_map, known_or_cut
    from tlearn.engines.feature_map import open_feature_map as open_file
    from tlearn.errors import MissingExtra, require
    from tlearn.features.cache import default_cache_dir
    from tlearn.predict import compile_cache

    model_file = bundle.feature_map_file
    if model_file is None:
        folder = default_cache_dir() / "engines" / state_key(bundle.backbone_state(), bundle.preprocessing)
        folder.mkdir(parents=True, exist_ok=True)
        reference = folder / "reference.safetensors"
        if not reference.exists():
            import shutil

            shutil.copyfile(bundle.engine_files[1], reference)
        fp32 = bundle.engine is not None and bundle.engine.precision != "int8"
        model_file = known_or_cut(folder, bundle.engine_files[0] if fp32 else None)  # cut: no torch
        if model_file is False:
            raise _no_spatial_map(bundle)
    if model_file is None:
        try:
            require("torch", "train", "a heat map of a model folder without a feature-map engine")
        except MissingExtra:
            raise BundleError("this model folder has no feature-map engine for heat maps (written by an older "
                              "tlearn, or a backbone without a spatial map before its pooling, as VGG16): train it "
                              "again with this tlearn (seconds on cached features), or install the train extra "
                              "(pip install 'tlearn[train]') to export one on the fly") from None
        model_file = export_feature_map(bundle.build_model().backbone, bundle.preprocessing, folder)
        if model_file is None:
            raise _no_spatial_map(bundle)
    return open_file(model_file, bundle.engine_files[1], engine, precision, compile_cache())


def _no_spatial_map(bundle: Bundle) -> BundleError:
    return BundleError(f"{bundle.backbone.name} has no spatial feature map before its pooling (fully connected "
                       "layers follow its last convolution): no class activation map")


def class_index(classes: list[str], class_: str | None, probabilities: np.ndarray) -> int:
    """The index of `class_` (by name), or of the top-1 class; InvalidParameter for a class the model lacks."""
    if class_ is None:
        return int(np.argmax(probabilities))
    if class_ not in classes:
        raise InvalidParameter(f"the model has no class {class_!r}; its classes are: {', '.join(classes)}")
    return classes.index(class_)


def explain_pixels(predictor: Predictor, pixels: np.ndarray, class_: str | None = None
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """(grid (h, w), calibrated probabilities, class index) of uint8 pixels (1, 3, H, W): one forward pass of the
    feature-map engine (two with the model's test-time augmentation, as its predictions)."""
    grids, probabilities, indices = explain_batch(predictor, pixels, class_)
    return grids[0], probabilities[0], int(indices[0])


def explain_batch(predictor: Predictor, pixels: np.ndarray, class_: str | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grids (n, h, w), calibrated probabilities (n, classes) and explained class indices (n,) of uint8 pixels
    (n, 3, H, W), in one batched pass of the feature-map engine."""
    maps = predictor.feature_maps(pixels)
    if predictor.bundle.tta:  # the mirror's map, flipped back into place: the mean of the two views' features
        maps = (maps + predictor.feature_maps(mirror(pixels))[..., ::-1]) / 2
    from tlearn.engines.feature_map import pooled
    from tlearn.predict import softmax

    features = pooled(maps)
    head = predictor.bundle.head(calibrated=True)
    if predictor.engine.precision == "int8":  # the map runs at fp32: the class and probability are predict's own
        probabilities = predictor.probabilities(pixels)
    else:
        probabilities = softmax(head.logits(features))
    indices = np.array([class_index(predictor.classes, class_, p) for p in probabilities], np.int64)
    weights, rest = place_weights(head, features, indices)
    places = maps.shape[2] * maps.shape[3]
    grids = (np.einsum("nchw,nc->nhw", maps.astype(np.float32), weights) + rest[:, None, None]) / places
    return grids.astype(np.float32), probabilities, indices


def place_weights(head: LinearHead, features: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(weights (n, C), rest (n,)) such that each place's share of class `indices[i]`'s logit (less its bias) is
    (weights[i] . F_place + rest[i]) / places: the shares sum to it.

    On the features alone the logit is linear in the map (the features are its mean): weights = the class's head
    weights over the features' norm, rest 0. The ImageNet prior's part (tlearn.train.head.ImageNetPrior) is not
    linear: it is split by its first-order Taylor term at the image's features (the ImageNet classifier is linear
    in the map too), and what that leaves over is shared evenly by the places (it moves no place against another)."""
    features = np.asarray(features, np.float64)
    norms = np.maximum(np.linalg.norm(features, axis=1), 1e-12)
    weight = np.asarray(head.weight, np.float64)[indices]
    if head.prior is None:
        return (weight / norms[:, None]).astype(np.float32), np.zeros(len(indices), np.float32)
    prior, dim = head.prior, features.shape[1]
    s = np.sqrt(1 + prior.scale ** 2)  # the norm of the head's inputs (two unit blocks)
    p = prior.probabilities(features)
    root, u = np.sqrt(p), weight[:, dim:]
    value = prior.scale / s * (u * root).sum(1)  # the prior's part of the logit
    gradient = 0.5 * prior.scale / s * (u * root - p * (u * root).sum(1, keepdims=True))  # d value / d z
    linear = gradient @ prior.weight.astype(np.float64)  # d value / d features
    weights = weight[:, :dim] / (s * norms[:, None]) + linear
    rest = value - (linear * features).sum(1)
    return weights.astype(np.float32), rest.astype(np.float32)


def explain_image(predictor: Predictor, image: ImageInput, class_: str | None = None,
                  source: str = "<image 0>", max_pixels: int | None = None) -> Explanation:
    """The Explanation of one image (see Predictor.explain); DecodeError for an image that does not decode."""
    if class_ is not None:
        class_index(predictor.classes, class_, np.zeros(len(predictor.classes)))  # before any work
    if isinstance(image, (str, os.PathLike)):
        source = os.fsdecode(image)
    pixels = predictor.to_pixels(image, max_pixels=max_pixels)[None]
    grid, probabilities, index = explain_pixels(predictor, pixels, class_)
    size = image_size(image)
    box = tuple(int(round(v)) for v in predictor.preprocessing.crop_box(*size))
    return Explanation(source, predictor.classes[index], float(probabilities[index]),
                       predictor.classes[int(np.argmax(probabilities))], grid, size, box)


def image_size(image: ImageInput) -> tuple[int, int]:
    """(width, height) of an image as it is shown (EXIF orientation applied), from its header alone."""
    if isinstance(image, np.ndarray):
        return int(image.shape[1]), int(image.shape[0])
    if isinstance(image, Image.Image):
        return image.size
    opened = Image.open(io.BytesIO(bytes(image)) if isinstance(image, (bytes, bytearray, memoryview)) else image)
    with opened:
        turned = opened.getexif().get(0x0112) in (5, 6, 7, 8)  # orientations that swap width and height
        return (opened.height, opened.width) if turned else opened.size


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`grid` (h, w) resized bilinearly to `size` (width, height)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(grid, np.float32), "F").resize(
        size, Image.Resampling.BILINEAR), np.float32)


def scaled(values: np.ndarray) -> np.ndarray:
    """`values` scaled to [0, 1] from their lowest to their highest (all 0 when they are all equal)."""
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def overlay(picture: Image.Image, heat: np.ndarray, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """`heat` (height, width) in [0, 1] in matplotlib's jet colours, blended over the RGB `picture` (inside `box`
    only, when given: the part of the image the model saw)."""
    from matplotlib import colormaps

    if heat.shape != picture.size[::-1]:
        heat = upsample(heat, picture.size)
    colours = colormaps[COLOUR_MAP](np.clip(heat, 0, 1))[..., :3] * 255
    photo = np.asarray(picture.convert("RGB"), np.float32)
    alpha = np.full(heat.shape + (1,), OVERLAY_ALPHA, np.float32)
    if box is not None:
        left, top, right, bottom = box
        inside = np.zeros_like(alpha)
        inside[top:bottom, left:right] = 1
        alpha *= inside
    return Image.fromarray(((1 - alpha) * photo + alpha * colours).astype(np.uint8), "RGB")


def overlay_png(picture: Image.Image, explanation: Explanation) -> bytes:
    """The overlay of `explanation` on `picture` as PNG bytes, tagged as tlearn's (see is_overlay)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_TAG, f"{explanation.label} p={explanation.probability:.4f} source={explanation.source}")
    buffer = io.BytesIO()
    overlay(picture, explanation.heat, explanation.box).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def shown_picture(image: ImageInput) -> Image.Image:
    """The image as shown (EXIF-rotated RGB, full size) for an overlay."""
    if isinstance(image, np.ndarray):
        return Image.fromarray(image, "RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    source = io.BytesIO(bytes(image)) if isinstance(image, (bytes, bytearray, memoryview)) else image
    with Image.open(source) as opened:
        return ImageOps.exif_transpose(opened).convert("RGB")


def is_overlay(path: Path) -> bool:
    """Whether `path` is an overlay tlearn wrote (its PNG carries tlearn's tag): only those may be replaced."""
    try:
        with Image.open(path) as opened:
            return opened.format == "PNG" and PNG_TAG in getattr(opened, "text", {})
    except (OSError, ValueError, SyntaxError):
        return False


def overlay_targets(files: list[Path], out_dir: Path) -> list[Path]:
    """Where the overlay of each file goes: out_dir/<name>.heat.png, numbered when two inputs share a name."""
    targets, taken = [], set()
    for file in files:
        stem, n = Path(file).stem, 1
        while (name := f"{stem}{'' if n == 1 else f'-{n}'}.heat.png") in taken:
            n += 1
        taken.add(name)
        targets.append(Path(out_dir) / name)
    return targets


def write_overlays(predictor: Predictor, files: list[Path], out_dir: Path, class_: str | None = None
                   ) -> list[tuple[Path, Explanation]]:
    """The overlay of each file's heat map written into `out_dir`, with its Explanation. Every image is explained
    before anything is written: a class the model lacks, an image that does not decode, or a file in the way that
    is not an overlay tlearn wrote raises a TlearnError with no file touched."""
    from tlearn.errors import TlearnError
    from tlearn.files import write_atomically

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TlearnError(f"{out_dir} is a file; give a folder for the heat maps (--out)")
    targets = overlay_targets(files, out_dir)
    for target in targets:
        if target.exists() and not is_overlay(target):
            raise TlearnError(f"{target} exists and is not a heat map tlearn wrote; refusing to replace it: "
                              "choose another --out, or move it")
    done = []
    for file, target in zip(files, targets):
        explanation = predictor.explain(file, class_)
        done.append((target, explanation, overlay_png(shown_picture(file), explanation)))
    out_dir.mkdir(parents=True, exist_ok=True)
    for target, _, png in done:
        write_atomically(target, lambda tmp, data=png: Path(tmp).write_bytes(data))
    return [(target, explanation) for target, explanation, _ in done]


def heat_map_overlay(predictor: Predictor, cache_dir: Path | None = None):
    """A function: (an image's path, the longest side wanted) -> the overlay of its top-1 heat map, drawn at that
    size (the report's thumbnails); None when the model cannot explain (no feature-map engine: VGG, or an older
    model folder without the train extra). Overlays are kept in `cache_dir`/heatmaps by model and image content:
    a re-train that makes the same model draws none again."""
    if predictor.bundle.feature_map_file is None:
        return None
    return ReportHeatMaps(predictor, cache_dir)


class ReportHeatMaps:
    """(an image's path, the longest side wanted) -> the overlay of its top-1 heat map at that size; `prefetch`
    explains a list of images in batches first (one engine call per batch instead of one per image). The engine is
    opened on first need; one that cannot be opened or verified ends the heat maps (TlearnError each call)."""

    def __init__(self, predictor: Predictor, cache_dir: Path | None = None):
        import hashlib

        self.predictor, self.explained, self.broken = predictor, {}, None
        bundle = predictor.bundle
        digest = hashlib.sha256(f"tlearn-heat:1:{bundle.backbone.feature_key}:{bundle.temperature}:"
                                f"{bundle.tta}:{COLOUR_MAP}:{OVERLAY_ALPHA}".encode())
        digest.update(np.ascontiguousarray(bundle.state["head.weight"], np.float32).tobytes())
        digest.update(np.ascontiguousarray(bundle.state["head.bias"], np.float32).tobytes())
        prior = bundle.head().prior
        if prior is not None:
            digest.update(prior.digest.encode())
        self.model_key = digest.hexdigest()[:24]
        self.folder = Path(cache_dir) / "heatmaps" if cache_dir is not None else None

    def _cached(self, path: Path, side: int) -> Path | None:
        from tlearn.data.decode import content_hash

        if self.folder is None:
            return None
        content = content_hash(path)
        return None if content is None else self.folder / f"{self.model_key}-{content[:32]}-{side}.png"

    def prefetch(self, paths: list[Path], side: int) -> None:
        from tlearn.data.decode import DecodeError
        from tlearn.errors import TlearnError

        todo = [Path(p) for p in paths if Path(p) not in self.explained
                and not ((cached := self._cached(Path(p), side)) is not None and cached.is_file())]
        for start in range(0, len(todo), self.predictor.batch_size):
            chunk, pixels = [], []
            for path in todo[start:start + self.predictor.batch_size]:
                try:
                    pixels.append(self.predictor.to_pixels(path))
                    chunk.append(path)
                except DecodeError:
                    continue
            if not chunk or self.broken:
                continue
            try:
                grids, probabilities, indices = explain_batch(self.predictor, np.stack(pixels))
            except TlearnError as exc:
                self.broken = exc
                return
            for path, grid, p, i in zip(chunk, grids, probabilities, indices):
                size = image_size(path)
                box = tuple(int(round(v)) for v in self.predictor.preprocessing.crop_box(*size))
                classes = self.predictor.classes
                self.explained[path] = Explanation(os.fsdecode(path), classes[i], float(p[i]),
                                                   classes[int(np.argmax(p))], grid, size, box)

    def __call__(self, path: Path, side: int) -> Image.Image:
        from dataclasses import replace

        from tlearn.data.decode import load_image
        from tlearn.errors import TlearnError
        from tlearn.files import write_atomically

        cached = self._cached(Path(path), side)
        if cached is not None and cached.is_file():
            try:
                with Image.open(cached) as kept:
                    return kept.convert("RGB")
            except (OSError, ValueError, SyntaxError):  # damaged: drawn again below
                pass
        if self.broken is not None:
            raise self.broken
        explanation = self.explained.get(Path(path)) or self.predictor.explain(path)
        picture = load_image(path, draft_size=(side, side))
        picture.thumbnail((side, side))
        scale = (picture.width / explanation.size[0], picture.height / explanation.size[1])
        box = tuple(int(round(v * scale[i % 2])) for i, v in enumerate(explanation.box))
        small = replace(explanation, size=picture.size, box=box)
        drawn = overlay(picture, small.heat, small.box)
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(cached, lambda tmp: drawn.save(tmp, "PNG"))
            except (OSError, TlearnError):  # derived data (a full disk, say): drawn again next time
                pass
        return drawn
