"""The Predictor: a model folder loaded once, its verified engine opened once, predictions for any consumer.

Every consumer predicts through it: `tlearn predict`, `evaluate`, the export check, the server and the cluster job.
It needs no torch: the backbone runs on the exported engine in the model folder (onnxruntime or OpenVINO) and the
head in numpy. It never writes into the model folder, which may be read-only.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator, Sequence, Union

import numpy as np
from PIL import Image

from tlearn.bundle import WEIGHTS_FILE, Bundle
from tlearn.data.decode import DecodeError, check_size, decode_bytes, load_image, to_rgb
from tlearn.data.pipeline import PixelBatch, default_workers
from tlearn.engines.views import MeanOfViews, Mirrored
from tlearn.errors import BundleError, check_range

UNCERTAIN = "uncertain"  # the label of a prediction whose confidence is below the threshold asked for

ImageInput = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


@dataclass(frozen=True)
class Prediction:
    source: str  # the file's path, or "<image N>" for an image given in memory
    top: tuple[tuple[str, float], ...]  # (label, calibrated probability), best first
    uncertain: bool = False  # top probability below the min_confidence asked for
    probabilities: tuple[float, ...] | None = None  # every class, in the model's class order

    @property
    def label(self) -> str:
        return UNCERTAIN if self.uncertain else self.top[0][0]

    @property
    def top_label(self) -> str:
        return self.top[0][0]

    @property
    def score(self) -> float:
        return self.top[0][1]


@dataclass(frozen=True)
class Unreadable:
    source: str
    reason: str


class Predictions(list):
    """The list `predict` returns (Prediction or Unreadable per image, in input order), shown in a notebook as a
    table with thumbnails."""

    def _repr_html_(self) -> str:
        from tlearn.notebook import predictions_html

        return predictions_html(self)


@dataclass(frozen=True)
class ModelCard:
    """What a person or a client needs to know about a served model."""

    name: str
    classes: list[str]
    backbone: str
    architecture: str
    input_size: int
    weights_source: str  # the weights file's name and where it came from, never a path on this machine's disk
    weights_sha256: str
    model_sha256: str  # of model.safetensors
    metrics: dict
    recipe: str
    temperature: float
    engine: str  # the runtime actually used
    precision: str
    tta: bool  # predictions on the mean of the image's and its mirror's features: two forward passes per image
    tlearn_version: str

    def to_dict(self) -> dict:
        return asdict(self)


class Predictor:
    """A trained model ready to predict: thread-safe, batches what it is given."""

    def __init__(self, bundle: Bundle, engine, *, name: str = "model", batch_size: int = 32,
                 workers: int | None = None, model_sha256: str = ""):
        self.bundle, self.engine = bundle, engine
        # what turns pixels into the head's features: the engine, or the mean over the image and its mirror (the
        # model folder says which; its metrics were measured that way)
        self._forward = MeanOfViews(engine) if bundle.tta else engine
        self.classes, self.preprocessing = bundle.classes, bundle.preprocessing
        self.input_size = bundle.preprocessing.input_size
        self.batch_size = check_range("batch_size", batch_size, 1)
        self.workers = default_workers() if workers is None else check_range("workers", workers, 1)
        self._head = bundle.head(calibrated=True)
        self._lock = threading.Lock()  # one engine session: its requests are not shared between threads
        self._feature_map = None  # the feature-map engine (heat maps), opened on first use
        self._draft = bundle.preprocessing.draft_size()
        self.card = ModelCard(
            name=name, classes=list(bundle.classes), backbone=bundle.backbone.name,
            architecture=bundle.backbone.architecture, input_size=self.input_size,
            weights_source=_public_source(bundle.backbone.weights.source, bundle.backbone.weights.origin),
            weights_sha256=bundle.backbone.weights.sha256,
            model_sha256=model_sha256, metrics=bundle.metrics, recipe=str(bundle.training.get("recipe", "head")),
            temperature=bundle.temperature, engine=getattr(engine, "name", "?"),
            precision=getattr(engine, "precision", bundle.backbone.precision), tta=bundle.tta,
            tlearn_version=_version())

    @classmethod
    def load(cls, directory: str | Path, *, engine: str = "auto", precision: str | None = None,
             batch_size: int = 32, workers: int | None = None, device: str = "auto") -> "Predictor":
        """Read the model folder (every file checked against its SHA-256) and open its engine once."""
        directory = Path(directory)
        return cls.from_bundle(Bundle.load(directory), engine=engine, precision=precision, batch_size=batch_size,
                               workers=workers, name=directory.resolve().name, device=device)

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, engine: str = "auto", precision: str | None = None,
                    batch_size: int = 32, workers: int | None = None, name: str = "model",
                    device: str = "auto") -> "Predictor":
        """A Predictor of `bundle`, running its verified exported engine (no torch) on the CPU; on a GPU or TPU
        (`device`, tlearn.device: auto takes one the machine has) the model in torch there (the train extra)."""
        from tlearn.device import batch_size_for, resolve_device
        from tlearn.engines import open_files

        choice = resolve_device(device)
        if not choice.is_cpu and engine in ("auto", "torch") and bundle.backbone.precision != "int8":
            from tlearn.device import torch_device
            from tlearn.engines import PixelsToOutputs, TorchEngine
            from tlearn.errors import require

            require("torch", "train", f"predicting on {choice.name}")
            opened = TorchEngine(PixelsToOutputs(bundle.build_model().backbone, bundle.preprocessing),
                                 precision or bundle.backbone.precision, torch_device(choice))
            check_engine(bundle, opened)
            return cls(bundle, opened, name=name, batch_size=batch_size_for(choice, batch_size), workers=workers,
                       model_sha256=bundle.files.get(WEIGHTS_FILE, ""))

        if bundle.engine is None or bundle.engine_files is None:
            raise BundleError("this model carries no exported engine: train it again with this tlearn")
        precision = precision or bundle.backbone.precision
        if precision != bundle.backbone.precision and "int8" in (precision, bundle.backbone.precision):
            raise BundleError(f"this model's head was trained on {bundle.backbone.precision} features; it cannot "
                              f"predict at {precision}")
        if engine == "torch":  # the eager reference, on request: needs the train extra
            from tlearn.engines import PixelsToOutputs, TorchEngine

            opened = TorchEngine(PixelsToOutputs(bundle.build_model().backbone, bundle.preprocessing), precision)
        else:
            opened = open_files(*bundle.engine_files, bundle.engine.verdicts, engine, precision,
                                compile_cache=compile_cache())
        check_engine(bundle, opened)
        return cls(bundle, opened, name=name, batch_size=batch_size, workers=workers,
                   model_sha256=bundle.files.get(WEIGHTS_FILE, ""))

    @classmethod
    def with_engine(cls, bundle: Bundle, engine, feature_map=None, *, batch_size: int = 32,
                    workers: int | None = None, name: str = "model") -> "Predictor":
        """A Predictor of `bundle` on an engine already open (the train's own, which ran the bundle's engine
        files), checked like one `from_bundle` opens; `feature_map`: its feature-map engine, if opened too."""
        check_engine(bundle, engine)
        predictor = cls(bundle, engine, name=name, batch_size=batch_size, workers=workers,
                        model_sha256=bundle.files.get(WEIGHTS_FILE, ""))
        predictor._feature_map = feature_map
        return predictor

    def _repr_html_(self) -> str:
        from tlearn.notebook import predictor_html

        return predictor_html(self)

    # ---- single steps (the server and the cluster job compose these) ----------------------------------------
    def to_pixels(self, image: ImageInput, *, max_pixels: int | None = None) -> np.ndarray:
        """Decode (EXIF-rotated RGB, big JPEGs at reduced size), resize and centre-crop: uint8 (3, H, W).

        Raises DecodeError naming the problem. Thread-safe: pure CPU work, meant for a thread pool."""
        limits = {} if max_pixels is None else {"max_pixels": max_pixels}
        if isinstance(image, (bytes, bytearray, memoryview)):
            picture = decode_bytes(bytes(image), "<bytes>", self._draft, **limits)
        elif isinstance(image, (str, os.PathLike)):
            picture = load_image(image, self._draft, **limits)
        elif isinstance(image, Image.Image):
            picture = to_rgb(image)
        elif isinstance(image, np.ndarray):
            picture = _array_image(image)
        else:
            raise DecodeError("<input>", f"not an image: {type(image).__name__}")
        check_size(*picture.size, "<input>")
        try:
            return self.preprocessing.to_pixels(picture)
        except Exception as exc:  # a transform failing on a strange image is a fact about that image
            raise DecodeError("<input>", f"cannot preprocess image ({type(exc).__name__}: {exc})") from None

    def features(self, pixels: np.ndarray, *, concurrent: bool = False) -> np.ndarray:
        """The features the head sees of uint8 pixels (n, 3, H, W): pooled backbone features, averaged with the
        mirror's when the model predicts with test-time augmentation.

        By default one call runs at a time, its batch split across the engine's streams: the shortest wait for a
        single caller. With `concurrent`, the batch runs whole on one stream and calls from other threads run
        beside it, one per stream (an engine without streams still runs one call at a time): callers that decode
        in threads between calls, as the Ray actor does, then keep every stream busy."""
        pixels = self._check_pixels(pixels)
        if concurrent:
            from tlearn.engines import run_concurrent

            return run_concurrent(self._forward, pixels, self._lock)
        with self._lock:
            return self._forward(pixels)

    def view_features(self, pixels: np.ndarray, view: str) -> np.ndarray:
        """Pooled backbone features of one view ("image" or "mirror") of uint8 pixels (n, 3, H, W)."""
        pixels = self._check_pixels(pixels)
        with self._lock:
            return (self.engine if view == "image" else Mirrored(self.engine))(pixels)

    def probabilities(self, pixels: np.ndarray, *, concurrent: bool = False) -> np.ndarray:
        """Calibrated class probabilities (n, classes), float64, of uint8 pixels (n, 3, H, W); `concurrent`: see
        `features`."""
        return softmax(self._head.logits(self.features(pixels, concurrent=concurrent)))

    def rank(self, source: str, probabilities: np.ndarray, top_k: int = 1,
             min_confidence: float | None = None) -> Prediction:
        """The Prediction of one row of probabilities: the top_k classes, "uncertain" below min_confidence."""
        k = max(1, min(int(top_k), len(self.classes)))
        best = np.argsort(-probabilities, kind="stable")[:k]
        top = tuple((self.classes[c], float(probabilities[c])) for c in best)
        uncertain = min_confidence is not None and top[0][1] < min_confidence
        return Prediction(source, top, uncertain, tuple(float(p) for p in probabilities))

    def feature_maps(self, pixels: np.ndarray) -> np.ndarray:
        """The backbone's last spatial feature maps (n, C, h, w) of uint8 pixels (n, 3, H, W), before pooling:
        the model folder's feature-map engine, opened (and verified) on first use."""
        pixels = self._check_pixels(pixels)
        with self._lock:
            if self._feature_map is None:
                from tlearn.explain import open_feature_map

                self._feature_map = open_feature_map(self.bundle, getattr(self.engine, "name", "auto"),
                                                     getattr(self.engine, "precision", "fp32"))
            return self._feature_map(pixels)

    def explain(self, image: ImageInput, class_: str | None = None, *, max_pixels: int | None = None):
        """A class activation map of `image` (tlearn.explain.Explanation) for `class_`, a class name (default: the
        top-1 class): its heat at the image's size, and the probability of the class it explains. No torch; about
        one forward pass, as a prediction. DecodeError for an image that does not decode, InvalidParameter for a
        class the model does not have."""
        from tlearn.explain import explain_image

        return explain_image(self, image, class_, max_pixels=max_pixels)

    # ---- whole jobs --------------------------------------------------------------------------------------------
    def predict(self, images: Sequence[ImageInput], top_k: int = 1,
                min_confidence: float | None = None) -> Predictions:
        """One Prediction (or Unreadable, with the reason) per image, in input order. Paths may be files; in-memory
        images (bytes, PIL, uint8 (H, W, 3) arrays) are named "<image N>"."""
        _check_options(top_k, min_confidence)
        names = [os.fsdecode(i) if isinstance(i, (str, os.PathLike)) else f"<image {n}>" for n, i in enumerate(images)]
        rows = Predictions()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="tlearn-decode") as pool:
            for start in range(0, len(images), self.batch_size):
                chunk = list(range(start, min(start + self.batch_size, len(images))))
                decoded = list(pool.map(self._try_pixels, (images[i] for i in chunk)))
                good = [i for i, d in zip(chunk, decoded) if isinstance(d, np.ndarray)]
                proba = self.probabilities(np.stack([decoded[i - start] for i in good])) if good else []
                done = {i: self.rank(names[i], p, top_k, min_confidence) for i, p in zip(good, proba)}
                rows.extend(done.get(i) or Unreadable(names[i], decoded[i - start]) for i in chunk)
        return rows

    def iter_files(self, files: Sequence[Path], top_k: int = 1,
                   min_confidence: float | None = None) -> Iterator[Prediction | Unreadable]:
        """One row per file, in order, as batches complete: decoding in threads overlaps inference, and memory
        stays flat however many files there are."""
        _check_options(top_k, min_confidence)
        from tlearn.engines import run_batches

        with self._lock:
            for batch, features in run_batches(self._forward, self.pixel_batches(files)):
                rows: dict[int, Prediction | Unreadable] = {i: Unreadable(os.fsdecode(files[i]), r)
                                                            for i, r in batch.errors}
                if batch.indices:
                    proba = softmax(self._head.logits(features))
                    rows.update((i, self.rank(os.fsdecode(files[i]), p, top_k, min_confidence))
                                for i, p in zip(batch.indices, proba))
                yield from (rows[i] for i in sorted(rows))

    def score_files(self, files: Sequence[Path]) -> tuple[list[int], np.ndarray, np.ndarray, list[Unreadable]]:
        """For ranking what to label: the indices of the files that decode, their features (as the head sees them)
        and calibrated probabilities, and the files that do not decode."""
        from tlearn.engines import run_batches

        kept, features, unreadable = [], [], []
        with self._lock:
            for batch, x in run_batches(self._forward, self.pixel_batches(files)):
                unreadable += [Unreadable(os.fsdecode(files[i]), r) for i, r in batch.errors]
                if batch.indices:
                    kept += list(batch.indices)
                    features.append(np.asarray(x, np.float32))
        x = np.concatenate(features) if features else np.zeros((0, 1), np.float32)
        proba = softmax(self._head.logits(x)) if kept else np.zeros((0, len(self.classes)))
        return kept, x, proba, unreadable

    def pixel_batches(self, files: Sequence[Path]) -> Iterator[PixelBatch]:
        """uint8 batches of `files` through the one pixel pipeline (tlearn.engines.stream_pixels)."""
        from tlearn.engines import stream_pixels

        return stream_pixels(files, self.preprocessing, self.batch_size, self.workers, engine=self._forward)

    def _try_pixels(self, image: ImageInput) -> np.ndarray | str:
        try:
            return self.to_pixels(image)
        except DecodeError as exc:
            return exc.reason

    def _check_pixels(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels)
        expected = (3, self.input_size, self.input_size)
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != expected or not len(pixels):
            raise ValueError(f"pixels must be uint8 (n >= 1, {', '.join(map(str, expected))}), not "
                             f"{pixels.dtype} {pixels.shape}")
        return np.ascontiguousarray(pixels)


def check_engine(bundle: Bundle, engine) -> None:
    """The opened engine must compute the reference features on the reference photos, whatever verdicts the config
    records: BundleError when the engine (or the backbone weights, for torch) is not the one the model was made
    with, though the records were re-hashed."""
    from tlearn.engines import compare

    pixels, features = bundle.reference()
    verdict = compare(engine, pixels, features)
    if not verdict["ok"]:
        which = f"the backbone weights in {WEIGHTS_FILE}" if getattr(engine, "name", "") == "torch" else \
            f"the engine {os.fspath(bundle.engine_files[0])}"
        raise BundleError(f"{which}: other features than the ones the model was verified with "
                          f"({verdict['detail']}): another model's engine or weights were put in, or the file was "
                          "edited; restore the folder or train again")


def expand_paths(paths: Iterable[str | Path]) -> tuple[list[Path], list[Unreadable]]:
    """Files as given, folders searched recursively for images (sorted, links followed); missing paths, special
    files, broken links and unsupported formats are reported (tlearn.data.discovery.find_images)."""
    from tlearn.data.discovery import find_images

    files, problems = find_images(list(paths))
    return files, [Unreadable(os.fsdecode(p.path), p.reason) for p in problems]


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _check_options(top_k: int, min_confidence: float | None) -> None:
    check_range("top_k", top_k, 1)
    if min_confidence is not None:
        check_range("min_confidence", min_confidence, 0.0, 1.0)


def _public_source(source: str, origin: str) -> str:
    """What the card says of the weights' source: a file's name and origin ("file", "package", ...), not its path
    (the card is served to clients, who have no business knowing the server's folders)."""
    return f"{Path(source).name} ({origin})" if os.path.isabs(source) or os.sep in source else source


def _array_image(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise DecodeError("<array>", f"an image array must be uint8 (H, W, 3) RGB, not {array.dtype} {array.shape}")
    return Image.fromarray(array, "RGB")


def compile_cache() -> Path | None:
    """OpenVINO's compiled-model cache: the user's cache folder (never the model folder), when writable."""
    from tlearn.features.cache import default_cache_dir

    folder = default_cache_dir() / "openvino"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK) else None


def _version() -> str:
    try:
        return metadata.version("tlearn")
    except metadata.PackageNotFoundError:
        return "unknown"


