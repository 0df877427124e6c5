"""The public Python API: `ImageClassifier(...).fit(data)`, `.evaluate`, `.predict`, `.save`, and `load`.

The CLI and the server call this and nothing below it.
"""
from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from tlearn.backbones import create_backbone, get_spec
from tlearn.bundle import Bundle, Classifier
from tlearn.data import Dataset, DatasetError, find_dataset
from tlearn.engines import engine_key, open_engine, stream_pixels
from tlearn.evaluate import classification_metrics
from tlearn.features import FeatureCache, Features, extract_features, feature_key
from tlearn.predict import Prediction, Unreadable, expand_paths, predict_files
from tlearn.train import balanced_class_weight, fit_head


CALIBRATION_IMAGES = 128  # int8 activation ranges: enough images to cover the classes, few enough to be quick


class NotFittedError(RuntimeError):
    """The classifier has no trained model yet: call fit() or tlearn.load()."""


class ImageClassifier:
    """An image classifier made by transfer learning from an ImageNet backbone.

    The constructor only stores settings; `fit` learns (attributes ending in `_`).
    """

    def __init__(self, backbone: str = "efficientnet_lite0", *, weights: str | Path | None = None, seed: int = 0,
                 val_fraction: float = 0.15, test_fraction: float = 0.15, batch_size: int = 32,
                 workers: int | None = None, cache_dir: str | Path | None = None, progress: bool = True,
                 engine: str = "auto", precision: str | None = None):
        self.backbone, self.weights, self.seed = backbone, weights, seed
        # engine: auto|openvino|onnx|torch; precision of the frozen-backbone forward: fp32|bf16|int8
        # (None: fp32 when fitting, the bundle's own when loaded).
        self.engine, self.precision = engine, precision
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.batch_size, self.workers, self.cache_dir, self.progress = batch_size, workers, cache_dir, progress

    # ---- learning -------------------------------------------------------------------------------------------
    def fit(self, data: str | Path) -> "ImageClassifier":
        """Find the dataset, extract (or reuse cached) features, fit the head and measure it on val and test."""
        start = time.perf_counter()
        get_spec(self.backbone)  # an unknown name fails before any work
        torch.manual_seed(self.seed)
        dataset = find_dataset(data, self.seed, self.val_fraction, self.test_fraction)
        spec = get_spec(self.backbone)
        backbone, weights_info = create_backbone(self.backbone, self.weights)
        precision = self.precision or "fp32"
        key = feature_key(spec.architecture, weights_info.sha256, spec.preprocessing, precision)
        self._model = None
        features = self._split_features(dataset, backbone, spec.preprocessing, key, precision)
        xs = {split: f.vectors for split, f in features.items()}
        ys = {split: dataset.labels(split)[f.kept] for split, f in features.items()}
        _check_trainable(dataset, ys)
        class_weight = balanced_class_weight(ys["train"], len(dataset.classes))
        fit = fit_head(xs["train"], ys["train"], xs["val"], ys["val"], len(dataset.classes),
                       class_weight=class_weight, progress=self.progress)
        classifier = Classifier(backbone, fit.head)
        state = classifier.state_dict()
        failures = sorted({(str(p), r) for f in features.values() for p, r in f.failures})
        self.bundle_ = Bundle(
            classes=dataset.classes,
            backbone={"name": spec.name, "architecture": spec.architecture, "weights": weights_info.to_dict(),
                      "feature_dim": int(xs["train"].shape[1]), "feature_key": key, "precision": precision},
            preprocessing=spec.preprocessing, state=state,
            training={"recipe": "head", "seed": self.seed, "val_fraction": self.val_fraction,
                      "test_fraction": self.test_fraction, "head": {"type": "linear-softmax on L2-normalised features", "C": fit.C,
                                                                    "class_weight": class_weight.round(4).tolist(),
                                                                    "search": fit.search},
                      "skipped_files": [{"path": p, "reason": r} for p, r in failures]},
            split=dataset.describe())
        with torch.no_grad():
            logits = {split: classifier.classify_features(torch.from_numpy(x)).numpy() for split, x in xs.items()}
        self.bundle_.metrics = {split: classification_metrics(ys[split], logits[split].argmax(1), dataset.classes)
                                for split in ("val", "test") if split in xs}
        extracted = sum(f.computed for f in features.values())
        extract_seconds = sum(f.seconds for f in features.values())
        self.summary_ = {
            "data": str(dataset.root), "layout": dataset.layout, "classes": len(dataset.classes),
            "images": {split: len(dataset.split(split)) for split in dataset.splits},
            "skipped_files": failures, "ignored_files": [str(p) for p in dataset.ignored],
            "extracted": extracted, "from_cache": sum(len(f.kept) for f in features.values()) - extracted,
            "extract_seconds": extract_seconds,
            "images_per_second": extracted / extract_seconds if extracted and extract_seconds else None,
            "C": fit.C, "seconds": time.perf_counter() - start,
        }
        return self

    def _split_features(self, dataset: Dataset, backbone, preprocessing, key: str,
                        precision: str) -> dict[str, Features]:
        with FeatureCache(key, self.cache_dir) as cache:
            engine = self._engine_opener(backbone, preprocessing, cache.directory / "engines", precision,
                                         dataset.paths("train"))
            return {split: extract_features(backbone, preprocessing, dataset.paths(split), cache, self.batch_size,
                                            self.workers, self.progress, description=split, engine=engine)
                    for split in dataset.splits}

    def _engine_opener(self, backbone, preprocessing, folder: Path, precision: str,
                       calibration_paths: Sequence[Path] = ()):
        """Opens the engine once, on first use; int8 calibrates on up to 128 training images (seeded sample)."""
        def calibration():
            order = np.random.default_rng(self.seed).permutation(len(calibration_paths))[:CALIBRATION_IMAGES]
            sample = [calibration_paths[i] for i in sorted(order)]
            return (b.pixels for b in stream_pixels(sample, preprocessing, 16, self.workers) if len(b.indices))

        return functools.cache(lambda: open_engine(backbone, preprocessing, folder, self.engine, precision,
                                                   calibration if len(calibration_paths) else None))

    # ---- using a fitted model ---------------------------------------------------------------------------------
    @property
    def classes_(self) -> list[str]:
        return self._bundle().classes

    @property
    def metrics_(self) -> dict:
        return self._bundle().metrics

    def model(self) -> Classifier:
        """The torch classifier (backbone + head), built once from the bundle."""
        if getattr(self, "_model", None) is None:
            self._model = self._bundle().build_model()
        return self._model

    def evaluate(self, data: str | Path, split: str = "test") -> dict:
        """Metrics of the model on one split of `data` (features come from the cache when present)."""
        bundle = self._bundle()
        training = bundle.training
        dataset = find_dataset(data, training.get("seed", 0), training.get("val_fraction", 0.15),
                               training.get("test_fraction", 0.15))
        _check_same_classes(dataset, bundle.classes)
        precision = bundle.backbone.get("precision", "fp32")
        if self.precision not in (None, precision):
            raise ValueError(f"this model's head was trained on {precision} features; evaluate it with "
                             f"--precision {precision}")
        with FeatureCache(bundle.backbone["feature_key"], self.cache_dir) as cache:
            engine = self._engine_opener(self.model().backbone, bundle.preprocessing, self._engine_folder(cache),
                                         precision)
            features = extract_features(self.model().backbone, bundle.preprocessing, dataset.paths(split), cache,
                                        self.batch_size, self.workers, self.progress, description=split,
                                        engine=engine)
        with torch.no_grad():
            logits = self.model().classify_features(torch.from_numpy(features.vectors)).numpy()
        result = classification_metrics(dataset.labels(split)[features.kept], logits.argmax(1), bundle.classes)
        result["skipped_files"] = [{"path": str(p), "reason": r} for p, r in features.failures]
        return result

    def iter_predict(self, paths: Iterable[str | Path], top_k: int = 1) -> Iterator[Prediction | Unreadable]:
        """Stream one Prediction (or Unreadable, with the reason) per image; folders are searched recursively."""
        files, missing = expand_paths(paths)
        yield from missing
        bundle = self._bundle()
        precision = self.precision or bundle.backbone.get("precision", "fp32")
        with FeatureCache(bundle.backbone["feature_key"], self.cache_dir) as cache:
            folder = self._engine_folder(cache)
        engine = self._engine_opener(self.model().backbone, bundle.preprocessing, folder, precision)()
        yield from predict_files(self.model(), bundle.classes, bundle.preprocessing, files, top_k,
                                 self.batch_size, self.workers, engine)

    def _engine_folder(self, cache: FeatureCache) -> Path:
        """Exported engines live in the model folder (they travel with it) when it is writable, else the cache."""
        directory = getattr(self, "directory_", None)
        if directory is not None and os.access(directory, os.W_OK):
            return Path(directory) / "engines"
        return cache.directory / "engines"

    def predict(self, paths: Sequence[str | Path], top_k: int = 1) -> list[Prediction | Unreadable]:
        """All predictions of `iter_predict` as a list."""
        return list(self.iter_predict(paths, top_k))

    def predict_proba(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Class probabilities (n_images, n_classes) in `classes_` order; raises if any image is unreadable."""
        rows = self.predict(paths, top_k=len(self.classes_))
        bad = [r for r in rows if isinstance(r, Unreadable)]
        if bad:
            raise ValueError(f"cannot read {bad[0].path}: {bad[0].reason}")
        index = {c: i for i, c in enumerate(self.classes_)}
        proba = np.zeros((len(rows), len(index)))
        for r, row in enumerate(rows):
            for label, p in row.top:
                proba[r, index[label]] = p
        return proba

    def save(self, directory: str | Path) -> Path:
        """Write the model folder (safetensors weights, config.json, metrics.json, and an int8 engine if used)."""
        directory = self._bundle().save(directory)
        if self._bundle().backbone.get("precision") == "int8":
            # The int8 model was calibrated on the training images, which predict may not have: ship it.
            key = engine_key(self.model().backbone, self._bundle().preprocessing)
            with FeatureCache(self._bundle().backbone["feature_key"], self.cache_dir) as cache:
                source = cache.directory / "engines" / key / "model-int8.onnx"
            if source.exists():
                (directory / "engines" / key).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, directory / "engines" / key / source.name)
        self.directory_ = directory
        return directory

    def _bundle(self) -> Bundle:
        if not hasattr(self, "bundle_"):
            raise NotFittedError("this ImageClassifier is not trained: call fit(data) or tlearn.load(folder)")
        return self.bundle_


def load(directory: str | Path, **settings) -> ImageClassifier:
    """A trained ImageClassifier from a model folder written by `save` / `tlearn train`."""
    bundle = Bundle.load(directory)
    clf = ImageClassifier(bundle.backbone.get("name", bundle.backbone["architecture"]),
                          seed=bundle.training.get("seed", 0), **settings)
    clf.bundle_, clf.directory_ = bundle, Path(directory)
    return clf


def _check_trainable(dataset: Dataset, ys: dict[str, np.ndarray]) -> None:
    for split in ("train", "val"):
        present = set(ys[split].tolist())
        lost = [c for i, c in enumerate(dataset.classes) if i not in present]
        if lost:
            raise DatasetError(f"no readable image left for class(es) {', '.join(lost)} in the {split} split "
                               "(every file failed to decode; see the skipped files)")


def _check_same_classes(dataset: Dataset, classes: list[str]) -> None:
    if dataset.classes != classes:
        raise DatasetError(f"{dataset.root} has classes {dataset.classes}, but the model was trained on {classes}")
