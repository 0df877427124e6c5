"""The public Python API: `ImageClassifier(...).fit(data)`, `.evaluate`, `.predict`, `.save`, and `load`.

The CLI and the server call this and nothing below it.
"""
from __future__ import annotations

import copy
import functools
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np

from tlearn.backbones import create_backbone, get_spec, locate_weights, state_sha256
from tlearn.bundle import Bundle
from tlearn.data import Dataset, DatasetError, find_dataset
from tlearn.data.doctor import quick_check
from tlearn.engines import open_engine, open_exported, state_key, stream_pixels
from tlearn.evaluate import classification_metrics
from tlearn.evaluate.calibration import calibrate
from tlearn.evaluate.metrics import ScoredSplit
from tlearn.features import FeatureCache, Features, extract_features, feature_key
from tlearn.predict import Prediction, Unreadable, expand_paths, predict_files
from tlearn.train import LinearHead, balanced_class_weight, fit_head
from tlearn.train.settings import FinetuneSettings

if TYPE_CHECKING:  # torch is imported only where images go through a network: a re-train on cached features
    from torch import nn  # (the head is numpy, tlearn.train.head) never imports it

    from tlearn.classifier import Classifier
    from tlearn.engines.export import ExportCheck


CALIBRATION_IMAGES = 128  # int8 activation ranges: enough images to cover the classes, few enough to be quick


RECIPES = ("head", "finetune", "auto")
# "auto" fine-tunes when there is room above the head on val and enough images per class to learn from
AUTO_MIN_TRAIN_PER_CLASS, AUTO_HEAD_GOOD_ENOUGH = 20, 0.995


class NotFittedError(RuntimeError):
    """The classifier has no trained model yet: call fit() or tlearn.load()."""


class ImageClassifier:
    """An image classifier made by transfer learning from an ImageNet backbone.

    The constructor only stores settings; `fit` learns (attributes ending in `_`).
    """

    def __init__(self, backbone: str = "efficientnet_lite0", *, weights: str | Path | None = None, seed: int = 0,
                 val_fraction: float = 0.15, test_fraction: float = 0.15, batch_size: int = 32,
                 workers: int | None = None, cache_dir: str | Path | None = None, progress: bool = True,
                 engine: str = "auto", precision: str | None = None, recipe: str = "head",
                 finetune: FinetuneSettings | None = None, run_dir: str | Path | None = None):
        self.backbone, self.weights, self.seed = backbone, weights, seed
        # engine: auto|openvino|onnx|torch; precision of the frozen-backbone forward: fp32|bf16|int8
        # (None: fp32 when fitting, the bundle's own when loaded).
        self.engine, self.precision = engine, precision
        self.recipe, self.finetune, self.run_dir = recipe, finetune, run_dir
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.batch_size, self.workers, self.cache_dir, self.progress = batch_size, workers, cache_dir, progress

    # ---- learning -------------------------------------------------------------------------------------------
    def fit(self, data: str | Path, resume: bool = False) -> "ImageClassifier":
        """Find the dataset, extract (or reuse cached) features, fit the head and measure it on val and test.

        Then, per `recipe`, fine-tune (stage 2) and keep the better stage on val; `resume` continues an
        interrupted fine-tune from the last checkpoint in `run_dir`.
        """
        start = time.perf_counter()
        spec = get_spec(self.backbone)  # an unknown name fails before any work
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of: {', '.join(RECIPES)}")
        if resume:  # before any work: a resume with nothing to resume from is a mistake
            from tlearn.train.finetune import last_checkpoint

            last_checkpoint(self.run_dir or "")
        dataset = find_dataset(data, self.seed, self.val_fraction, self.test_fraction, cache_dir=self.cache_dir)
        hashes = dataset.hashes  # read once, while the files were fingerprinted
        checks = quick_check(dataset, hashes)
        weights_info = locate_weights(self.backbone, self.weights)
        precision = self.precision or "fp32"
        key = feature_key(spec.architecture, weights_info.sha256, spec.preprocessing, precision)
        self._model = None
        # the network is built only if something is left to extract (or to fine-tune)
        build_backbone = functools.cache(lambda: create_backbone(self.backbone, self.weights)[0])
        features = self._split_features(dataset, build_backbone, spec.preprocessing, key, precision, hashes)
        xs = {split: f.vectors for split, f in features.items()}
        ys = {split: dataset.labels(split)[f.kept] for split, f in features.items()}
        _check_trainable(dataset, ys)
        class_weight = balanced_class_weight(ys["train"], len(dataset.classes))
        fit = fit_head(xs["train"], ys["train"], xs["val"], ys["val"], len(dataset.classes),
                       class_weight=class_weight, progress=self.progress)
        state = {**{f"backbone.{k}": v for k, v in self._backbone_state(build_backbone, key).items()},
                 **{f"head.{k}": v for k, v in fit.head.state().items()}}
        failures = sorted({(str(p), r) for f in features.values() for p, r in f.failures} |
                          {(str(s.path), s.reason) for s in dataset.skipped})
        self.bundle_ = Bundle(
            classes=dataset.classes,
            backbone={"name": spec.name, "architecture": spec.architecture, "weights": weights_info.to_dict(),
                      "feature_dim": int(xs["train"].shape[1]), "feature_key": key, "precision": precision},
            preprocessing=spec.preprocessing, state=state,
            training={"recipe": "head", "seed": self.seed, "val_fraction": self.val_fraction,
                      "test_fraction": self.test_fraction,
                      "head": {"type": "linear-softmax on L2-normalised features", "C": fit.C,
                               "class_weight": class_weight.round(4).tolist(), "search": fit.search},
                      "skipped_files": [{"path": p, "reason": r} for p, r in failures]},
            split=dataset.describe())
        logits = {split: fit.head.logits(x) for split, x in xs.items()}
        self.bundle_.metrics = {split: classification_metrics(ys[split], logits[split].argmax(1), dataset.classes,
                                                              self.seed)
                                for split in ("val", "test") if split in xs}
        self._scored = {split: ScoredSplit(split, [dataset.paths(split)[i] for i in features[split].kept], ys[split],
                                           logits[split]) for split in ("val", "test") if split in xs}
        self.bundle_.extra["calibration"] = calibrate(self._scored)
        self.bundle_.extra["data_checks"] = checks.to_dict()
        extracted = sum(f.computed for f in features.values())
        extract_seconds = sum(f.seconds for f in features.values())
        self.summary_ = {
            "data": str(dataset.root), "layout": dataset.layout, "classes": len(dataset.classes),
            "images": {split: len(dataset.split(split)) for split in dataset.splits},
            "skipped_files": failures, "ignored_files": [str(p) for p in dataset.ignored],
            "extracted": extracted, "from_cache": sum(len(f.kept) for f in features.values()) - extracted,
            "extract_seconds": extract_seconds,
            "images_per_second": extracted / extract_seconds if extracted and extract_seconds else None,
            "C": fit.C, "seconds": time.perf_counter() - start, "data_checks": checks.to_dict(), "recipe": "head",
        }
        if self._wants_finetune(dataset):
            self._fine_tune(dataset, build_backbone(), fit.head, logits, ys, resume)
            self.summary_["seconds"] = time.perf_counter() - start
        return self

    def _wants_finetune(self, dataset: Dataset) -> bool:
        if self.recipe != "auto":
            return self.recipe == "finetune"
        per_class = len(dataset.split("train")) / len(dataset.classes)
        return per_class >= AUTO_MIN_TRAIN_PER_CLASS and self.bundle_.metrics["val"]["accuracy"] < AUTO_HEAD_GOOD_ENOUGH

    def _fine_tune(self, dataset: Dataset, backbone: nn.Module, head: LinearHead, head_logits: dict, head_ys: dict,
                   resume: bool) -> None:
        """Stage 2 from the stage-1 head; the bundle becomes the better stage on val, both stages recorded."""
        from tlearn.train.recipe import fine_tune_stage, val_score

        settings = self.finetune or FinetuneSettings(batch_size=self.batch_size)
        # a copy: the stage-1 bundle's tensors are views of `backbone`'s, and must stay as they are
        tuned = fine_tune_stage(dataset, get_spec(self.backbone), copy.deepcopy(backbone), head, settings, self.run_dir,
                                resume=resume, seed=self.seed, workers=self.workers, batch_size=self.batch_size,
                                progress=self.progress)
        bundle, classes, result = self.bundle_, dataset.classes, tuned.result
        stages = {"head": dict(bundle.metrics),
                  "finetune": {split: classification_metrics(tuned.labels[split], x.argmax(1), classes)
                               for split, x in tuned.logits.items()}}
        scores = {"head": val_score(head_logits["val"], head_ys["val"]),
                  "finetune": val_score(tuned.logits["val"], tuned.labels["val"])}
        chosen = "finetune" if scores["finetune"] > scores["head"] else "head"
        if chosen == "finetune":
            _adopt_weights(bundle, result.model.numpy_state())
            # the temperature and the report's per-image results belong to the model that is kept
            self._scored = {split: ScoredSplit(split, tuned.paths[split], tuned.labels[split], x)
                            for split, x in tuned.logits.items()}
            bundle.extra["calibration"] = calibrate(self._scored)
        epochs = len(result.history)
        bundle.training["recipe"] = self.recipe
        bundle.training["finetune"] = {
            **settings.to_dict(), "chosen": chosen, "precision_used": result.precision, "unfrozen": result.unfrozen,
            "class_weights": result.class_weights, "best_epoch": result.best_epoch, "epochs_run": epochs,
            "seconds": result.seconds, "run_dir": str(self.run_dir) if self.run_dir else None,
            "val_score": {k: {"accuracy": a, "log_loss": -nl} for k, (a, nl) in scores.items()}}
        bundle.metrics = {**stages[chosen], "stages": stages}
        bundle.extra["history"] = result.history
        self.summary_.update(recipe=chosen, finetune=bundle.training["finetune"])
        self._model = None

    def _split_features(self, dataset: Dataset, build_backbone: Callable[[], nn.Module], preprocessing, key: str,
                        precision: str, hashes: dict[Path, str | None]) -> dict[str, Features]:
        with FeatureCache(key, self.cache_dir) as cache:
            engine = self._engine_opener(build_backbone, preprocessing, cache.directory / "engines", precision,
                                         dataset.paths("train"))
            return {split: extract_features(None, preprocessing, dataset.paths(split), cache, self.batch_size,
                                            self.workers, self.progress, description=split, engine=engine,
                                            hashes=[hashes[p] for p in dataset.paths(split)])
                    for split in dataset.splits}

    def _backbone_state(self, build_backbone: Callable[[], nn.Module], key: str) -> dict[str, np.ndarray]:
        """The backbone's tensors for the bundle. When every feature came from the cache no network was built, and
        they are read from the cache, stored there the first time: a re-train never imports torch. Otherwise they
        are views of the network's own tensors, not copies (VGG's are 0.5 GB): whoever changes the network after
        this (fine-tuning) works on a copy of it."""
        with FeatureCache(key, self.cache_dir) as cache:
            state = None if build_backbone.cache_info().currsize else cache.backbone_state()
            if state is None:
                state = {k: v.detach().numpy() for k, v in build_backbone().state_dict().items()}
                cache.put_backbone_state(state)
        return state

    def _engine_opener(self, build_backbone: Callable[[], nn.Module], preprocessing, folder: Path, precision: str,
                       calibration_paths: Sequence[Path] = ()):
        """Opens the engine once, on first use (the backbone is built then); int8 calibrates on up to 128 training
        images (seeded sample)."""
        calibration = functools.partial(self._calibration_batches, calibration_paths, preprocessing)
        return functools.cache(lambda: open_engine(build_backbone(), preprocessing, folder, self.engine, precision,
                                                   calibration if len(calibration_paths) else None))

    def _calibration_batches(self, paths: Sequence[Path], preprocessing) -> Iterator[np.ndarray]:
        """uint8 batches of a seeded sample of up to 128 of `paths`: int8 activation ranges are fitted on them."""
        order = np.random.default_rng(self.seed).permutation(len(paths))[:CALIBRATION_IMAGES]
        sample = [paths[i] for i in sorted(order)]
        return (b.pixels for b in stream_pixels(sample, preprocessing, 16, self.workers) if len(b.indices))

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
        scored, failures = self._score(data, (split,))
        result = classification_metrics(scored[split].labels, scored[split].logits.argmax(1), self.classes_,
                                        self.seed)
        result["skipped_files"] = [{"path": str(p), "reason": r} for p, r in failures]
        return result

    def scored_splits(self, data: str | Path | None = None, splits: Sequence[str] = ("val", "test")
                      ) -> dict[str, ScoredSplit]:
        """Per-image labels and uncalibrated logits of the `splits` of `data` that exist (features from the cache).

        Without `data`: the splits scored by `fit` in this session, else the training folder the bundle records."""
        if data is None and getattr(self, "_scored", None):
            return {name: s for name, s in self._scored.items() if name in splits}
        data = data or self._bundle().extra.get("data_checks", {}).get("root")
        if data is None or not Path(data).is_dir():
            raise ValueError(f"the training data folder ({data}) is not there: give the dataset folder")
        return self._score(data, splits)[0]

    def report(self, directory: str | Path, data: str | Path | None = None) -> Path:
        """Write DIRECTORY/report.html and the PNGs it shows; returns the HTML path."""
        from tlearn.evaluate.report import ReportInputs, write_report  # matplotlib: only loaded when needed

        bundle = self._bundle()
        return write_report(directory, ReportInputs(
            classes=bundle.classes, scored=self.scored_splits(data), seed=self.seed,
            calibration=bundle.extra.get("calibration", {}), history=bundle.extra.get("history", []),
            data_checks=bundle.extra.get("data_checks", {}),
            facts={"backbone": bundle.backbone.get("name", bundle.backbone["architecture"]),
                   "recipe": bundle.training.get("recipe", "?"), "layout": bundle.split.get("layout", "?")}))

    def _score(self, data: str | Path, splits: Sequence[str]) -> tuple[dict[str, ScoredSplit], list]:
        bundle = self._bundle()
        training = bundle.training
        dataset = find_dataset(data, training.get("seed", 0), training.get("val_fraction", 0.15),
                               training.get("test_fraction", 0.15), cache_dir=self.cache_dir)
        _check_same_classes(dataset, bundle.classes)
        precision = bundle.backbone.get("precision", "fp32")
        if self.precision not in (None, precision):
            raise ValueError(f"this model's head was trained on {precision} features; evaluate it with "
                             f"--precision {precision}")
        scored, failures = {}, []
        with FeatureCache(bundle.backbone["feature_key"], self.cache_dir) as cache:
            engine = functools.cache(self._prediction_engine)  # opened only if a feature is not cached
            for split in splits:
                if split not in dataset.splits and len(splits) > 1:
                    continue  # e.g. no test split: score what there is
                features = extract_features(None, bundle.preprocessing, dataset.paths(split), cache,
                                            self.batch_size, self.workers, self.progress, description=split,
                                            engine=engine)
                failures += features.failures
                scored[split] = ScoredSplit(split, [dataset.paths(split)[i] for i in features.kept],
                                            dataset.labels(split)[features.kept],
                                            bundle.head().logits(features.vectors).astype(np.float64))
        return scored, failures

    def iter_predict(self, paths: Iterable[str | Path], top_k: int = 1,
                     min_confidence: float | None = None) -> Iterator[Prediction | Unreadable]:
        """Stream one Prediction (or Unreadable, with the reason) per image; folders are searched recursively.

        Probabilities are calibrated (the bundle's temperature); below `min_confidence` the label is "uncertain"."""
        files, missing = expand_paths(paths)
        yield from missing
        bundle = self._bundle()
        yield from predict_files(bundle.head(calibrated=True).logits, bundle.classes, bundle.preprocessing, files,
                                 self._prediction_engine(), top_k, self.batch_size, self.workers, min_confidence)

    def _prediction_engine(self):
        """The backbone's engine: opened from files exported and verified for these weights before, in the model
        folder or the feature cache (no network built, no torch), else exported now from the torch model."""
        bundle = self._bundle()
        precision = self.precision or bundle.backbone.get("precision", "fp32")
        with FeatureCache(bundle.backbone["feature_key"], self.cache_dir) as cache:
            folder, cached = self._engine_folder(cache), cache.directory / "engines"
        key = state_key(bundle.backbone_state(), bundle.preprocessing)
        for place in dict.fromkeys((folder, cached)):
            exported = open_exported(key, place, self.engine, precision)
            if exported is not None:
                return exported
        return self._engine_opener(lambda: self.model().backbone, bundle.preprocessing, folder, precision)()

    def _engine_folder(self, cache: FeatureCache) -> Path:
        """Exported engines live in the model folder (they travel with it) when it is writable, else the cache."""
        directory = getattr(self, "directory_", None)
        if directory is not None and os.access(directory, os.W_OK):
            return Path(directory) / "engines"
        return cache.directory / "engines"

    def predict(self, paths: Sequence[str | Path], top_k: int = 1,
                min_confidence: float | None = None) -> list[Prediction | Unreadable]:
        """All predictions of `iter_predict` as a list."""
        return list(self.iter_predict(paths, top_k, min_confidence))

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
            key = state_key(self._bundle().backbone_state(), self._bundle().preprocessing)
            with FeatureCache(self._bundle().backbone["feature_key"], self.cache_dir) as cache:
                source = cache.directory / "engines" / key / "model-int8.onnx"
            if source.exists():
                (directory / "engines" / key).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, directory / "engines" / key / source.name)
        self.directory_ = directory
        return directory

    def export(self, path: str | Path, *, int8: bool = False,
               images: Sequence[str | Path] | None = None) -> ExportCheck:
        """Write the whole classifier as one self-contained ONNX file and verify it against the torch model.

        Input "pixels": uint8 RGB (n, 3, H, W), resized and centre-cropped as the metadata says (normalisation is
        inside); output "probabilities": calibrated class probabilities. Classes and preprocessing are in its
        metadata_props. Verified with onnxruntime on `images` (default: up to 64 of the model's own test or val
        images, else scikit-image's photos); `int8` quantises the backbone, calibrated on 128 training images.
        Outside tolerance nothing is written and EngineError says by how much.
        """
        from tlearn.export import export_bundle

        calibration = functools.partial(self._calibration_batches, preprocessing=self._bundle().preprocessing)
        return export_bundle(self._bundle(), self.model(), Path(path), int8=int8, images=images,
                             calibration=calibration, batch_size=self.batch_size, workers=self.workers)

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


def _adopt_weights(bundle: Bundle, state: dict[str, np.ndarray]) -> None:
    """Fine-tuned weights into the bundle, with a feature-cache key of their own (stage-1 features no longer fit)."""
    bundle.state = dict(state)
    bundle.backbone["fine_tuned_sha256"] = state_sha256(bundle.backbone_state())
    bundle.backbone["feature_key"] = feature_key(bundle.backbone["architecture"], bundle.backbone["fine_tuned_sha256"],
                                                 bundle.preprocessing, bundle.backbone.get("precision", "fp32"))


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
