"""The public Python API: `ImageClassifier(...).fit(data)`, `.evaluate`, `.predict`, `.save`, `.export`, and `load`.

A thin facade: settings are validated where they enter (TrainSettings), the recipe is tlearn.train.steps, every
prediction goes through one tlearn.Predictor, the model folder format is tlearn.bundle's.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from tlearn.bundle import Bundle, ModelFolder
from tlearn.errors import NotFittedError, TlearnError
from tlearn.predict import Prediction, Predictions, Predictor, Unreadable, expand_paths
from tlearn.train.settings import FinetuneSettings, TrainSettings

if TYPE_CHECKING:
    from tlearn.engines.export import ExportCheck
    from tlearn.evaluate.metrics import ScoredSplit
    from tlearn.train.steps import TrainSummary


class ImageClassifier:
    """An image classifier made by transfer learning from an ImageNet backbone.

    The constructor only stores settings; `fit` learns (attributes ending in `_`).
    """

    def __init__(self, backbone: str = "efficientnet_lite0", *, weights: str | Path | None = None, seed: int = 0,
                 val_fraction: float = 0.0, test_fraction: float = 0.15, batch_size: int = 32,
                 workers: int | None = None, cache_dir: str | Path | None = None, progress: bool = True,
                 engine: str = "auto", precision: str | None = None, recipe: str = "head",
                 finetune: FinetuneSettings | None = None, run_dir: str | Path | None = None,
                 ray: str | None = None, mirror: str = "off", relabel: str | Path | None = None,
                 device: str = "auto", imagenet_prior: str = "auto"):
        self.backbone, self.weights, self.seed = backbone, weights, seed
        self.val_fraction, self.test_fraction, self.batch_size, self.workers = (val_fraction, test_fraction,
                                                                                batch_size, workers)
        self.cache_dir, self.progress, self.engine, self.precision = cache_dir, progress, engine, precision
        self.recipe, self.finetune, self.run_dir, self.ray = recipe, finetune, run_dir, ray
        self.mirror, self.relabel, self.device, self.imagenet_prior = mirror, relabel, device, imagenet_prior

    def settings(self) -> TrainSettings:
        """The validated settings of a train (InvalidParameter names a bad one)."""
        return TrainSettings(
            backbone=self.backbone, weights=Path(self.weights) if self.weights else None, seed=self.seed,
            val_fraction=self.val_fraction, test_fraction=self.test_fraction, batch_size=self.batch_size,
            workers=self.workers, cache_dir=Path(self.cache_dir) if self.cache_dir else None, progress=self.progress,
            engine=self.engine, precision=self.precision or "fp32", recipe=self.recipe,
            finetune=self.finetune or FinetuneSettings(batch_size=self.batch_size),
            run_dir=Path(self.run_dir) if self.run_dir else None, ray=self.ray, mirror=self.mirror,
            relabel=Path(self.relabel) if self.relabel else None, device=self.device,
            imagenet_prior=self.imagenet_prior)

    def fit(self, data: str | Path, resume: bool = False) -> "ImageClassifier":
        """Find the dataset, extract (or reuse cached) features, fit the head, calibrate, maybe fine-tune.

        `resume` continues an interrupted fine-tune from the last checkpoint in `run_dir`."""
        from tlearn.errors import require
        from tlearn.train.fit import run_recipe

        require("timm", "train", "training")
        settings = self.settings()
        if resume:  # before any work: a resume with nothing to resume from is a mistake
            from tlearn.train.finetune import last_checkpoint

            last_checkpoint(settings.run_dir or "")
        result = run_recipe(data, settings, resume)
        self.bundle_, self.summary_, self._scored = result.bundle, result.summary, result.scored
        self._predictor = None
        if result.engine is not None and getattr(result.engine, "name", "torch") != "torch":
            # the report's predictions run on the engines the train opened: nothing is compiled again
            self._predictor = Predictor.with_engine(result.bundle, result.engine, result.feature_map_engine,
                                                    batch_size=self.batch_size, workers=self.workers,
                                                    name=Path(getattr(self, "directory_", "model")).name)
        return self

    # ---- using a fitted model ---------------------------------------------------------------------------------
    @property
    def classes_(self) -> list[str]:
        return self._bundle().classes

    @property
    def metrics_(self) -> dict:
        return self._bundle().metrics

    @property
    def summary(self) -> TrainSummary:
        return self.summary_

    def predictor(self) -> Predictor:
        """The Predictor of this model: its engine opened once, reused by every call."""
        if getattr(self, "_predictor", None) is None:
            self._predictor = Predictor.from_bundle(self._bundle(), engine=self.engine, precision=self.precision,
                                                    batch_size=self.batch_size, workers=self.workers,
                                                    device=self.device,
                                                    name=Path(getattr(self, "directory_", "model")).name)
        return self._predictor

    def iter_predict(self, paths: Sequence[str | Path], top_k: int = 1,
                     min_confidence: float | None = None) -> Iterator[Prediction | Unreadable]:
        """One Prediction (or Unreadable, with the reason) per image; folders are searched recursively.

        Probabilities are calibrated (the bundle's temperature); below `min_confidence` the label is "uncertain"."""
        files, missing = expand_paths(paths)
        yield from missing
        yield from self.predictor().iter_files(files, top_k, min_confidence)

    def predict(self, paths: Sequence[str | Path], top_k: int = 1,
                min_confidence: float | None = None) -> Predictions:
        """A Prediction (or Unreadable) per image, folders searched recursively (a notebook shows a table)."""
        return Predictions(self.iter_predict(paths, top_k, min_confidence))

    # ---- in a notebook --------------------------------------------------------------------------------------
    def _repr_html_(self) -> str:
        from tlearn.notebook import classifier_html

        return classifier_html(self)

    def plot_training_curves(self):
        """A matplotlib Figure of the fine-tune's loss and val accuracy per epoch (TlearnError for a head-only
        model, which has no epochs)."""
        from tlearn.evaluate.plots import laid_out, training_curves_figure

        history = self._bundle().extra.get("history")
        if not history:
            raise TlearnError("this model has no training curves: it was trained head-only (no epochs); train with "
                              "recipe='finetune' for curves")
        from tlearn.notebook import shown_inline

        return shown_inline(laid_out(training_curves_figure(history)))

    def plot_confusion_matrix(self, split: str | None = None, normalised: bool = False):
        """A matplotlib Figure of the confusion matrix of `split` (test, else val, as measured at training)."""
        from tlearn.evaluate.plots import confusion_matrix_figure

        metrics = self.metrics_
        split = split or next((s for s in ("test", "val") if metrics.get(s, {}).get("n")), None)
        if split is None or not metrics.get(split, {}).get("n"):
            raise TlearnError(f"no metrics of split {split!r} in this model (it has: "
                              f"{', '.join(s for s in ('val', 'test') if s in metrics) or 'none'})")
        from tlearn.notebook import shown_inline

        m = metrics[split]
        return shown_inline(confusion_matrix_figure(m["confusion_matrix"], m["classes"], normalised,
                                                    title=f"{split}: confusion matrix"))

    def predict_proba(self, paths: Sequence[str | Path]) -> np.ndarray:
        """Class probabilities (n_images, n_classes) in `classes_` order; raises if any image is unreadable."""
        rows = self.predict(paths)
        bad = [r for r in rows if isinstance(r, Unreadable)]
        if bad:
            raise TlearnError(f"cannot read {bad[0].source}: {bad[0].reason}")
        return np.array([r.probabilities for r in rows])

    def evaluate(self, data: str | Path, split: str = "auto") -> dict:
        """Metrics of the model on `data` (features from the cache when present), never on an image that trained it.

        `split`: "auto" scores the test split (val without one) of the folder the model was trained on, and every
        image of any other folder; or "test", "val", "train", "all". metrics["evaluated"] says what was scored and
        how many images were left out because their content trained the model (tlearn.scoring.evaluate_dataset)."""
        from tlearn.scoring import check_split, evaluate_dataset, metrics_of

        check_split(split)  # before the engine opens
        evaluation = evaluate_dataset(self.predictor(), data, split, self.cache_dir, self.progress)
        metrics = metrics_of(evaluation.scored, self.classes_, self._bundle().training.get("seed", 0))
        metrics["evaluated"] = evaluation.to_dict()
        return metrics

    def scored_splits(self, data: str | Path | None = None, splits=("val", "test")) -> dict[str, ScoredSplit]:
        """Per-image labels and uncalibrated logits of the `splits` of `data` that exist.

        Without `data`: the splits scored by `fit` in this session, else the training folder the bundle records."""
        from tlearn.scoring import score_dataset

        if data is None and getattr(self, "_scored", None):
            return {name: s for name, s in self._scored.items() if name in splits}
        data = data or self._bundle().extra.get("data_checks", {}).get("root")
        if data is None or not Path(data).is_dir():
            raise TlearnError(f"the training data folder ({data}) is not there: give the dataset folder")
        return score_dataset(self.predictor(), data, splits, self.cache_dir, self.progress)

    def report(self, directory: str | Path, data: str | Path | None = None) -> Path:
        """Write DIRECTORY/report.html and the PNGs it shows; returns the HTML path."""
        from tlearn.evaluate.report import ReportInputs, write_report  # matplotlib: only loaded when needed
        from tlearn.evaluate.suspects import find_suspects
        from tlearn.explain import heat_map_overlay
        from tlearn.features.cache import default_cache_dir

        bundle = self._bundle()
        heat_cache = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        oof = bundle.read_out_of_fold()
        root = data or bundle.extra.get("data_checks", {}).get("root")
        suspects = (find_suspects(oof.classes, oof.paths, oof.labels, oof.proba, source="this model's out_of_fold.csv")
                    if oof is not None else None)
        return write_report(directory, ReportInputs(
            classes=bundle.classes, scored=self.scored_splits(data), seed=self.seed,
            calibration=bundle.extra.get("calibration", {}), history=bundle.extra.get("history", []),
            data_checks=bundle.extra.get("data_checks", {}),
            facts={"backbone": bundle.backbone.name, "recipe": bundle.training.get("recipe", "?"),
                   "layout": bundle.split.get("layout", "?")}, heat_map=heat_map_overlay(self.predictor(), heat_cache),
            suspects=suspects, data_root=Path(root) if root and Path(root).is_dir() else None))

    def save(self, directory: str | Path, report: bool = True) -> Path:
        """Write the model folder whole (weights, config, metrics, the verified engine, the report), replacing a
        model that was there; a folder that is not a tlearn model is refused."""
        with ModelFolder(directory) as staging:
            self._bundle().write(staging)
            if report:
                self.report(staging / "report")
        self.directory_ = Path(directory)
        return self.directory_

    def export(self, path: str | Path, *, int8: bool = False,
               images: Sequence[str | Path] | None = None) -> ExportCheck:
        """Write the whole classifier as one self-contained ONNX file and verify it against the torch model.

        Input "pixels": uint8 RGB (n, 3, H, W), resized and centre-cropped as the metadata says (normalisation is
        inside); output "probabilities": calibrated class probabilities. Outside tolerance nothing is written."""
        from tlearn.export import export_bundle

        return export_bundle(self._bundle(), self.predictor(), Path(path), int8=int8, images=images,
                             seed=self.seed)

    def export_openvino(self, path: str | Path, *, images: Sequence[str | Path] | None = None) -> ExportCheck:
        """The whole classifier as OpenVINO IR (`path`.xml and its .bin), input and output as `export`'s ONNX
        file: exported to ONNX, converted, and verified against the torch model on the same images."""
        from tlearn.export import export_openvino_bundle

        return export_openvino_bundle(self._bundle(), self.predictor(), Path(path), images=images, seed=self.seed)

    def _bundle(self) -> Bundle:
        if not hasattr(self, "bundle_"):
            raise NotFittedError("this ImageClassifier is not trained: call fit(data) or tlearn.load(folder)")
        return self.bundle_


def load(directory: str | Path, **settings) -> ImageClassifier:
    """A trained ImageClassifier from a model folder written by `save` / `tlearn train` (every file checked)."""
    bundle = Bundle.load(directory)
    clf = ImageClassifier(bundle.backbone.name, seed=bundle.training.get("seed", 0), **settings)
    clf.bundle_, clf.directory_ = bundle, Path(directory)
    return clf



def doctor(data: str | Path, *, seed: int = 0, cache_dir: str | Path | None = None):
    """The dataset's checks (tlearn.data.doctor.DoctorReport: layout, counts per class and split, unreadable, tiny,
    duplicated and leaking files), as `tlearn doctor DATA` prints them; a notebook shows a table."""
    from tlearn.data.doctor import examine_dataset

    return examine_dataset(data, seed=seed, cache_dir=cache_dir)


def suspect_labels(data: str | Path, model: str | Path | None = None, *, ranked_by: str = "self_confidence",
                   cache_dir: str | Path | None = None, progress: bool = True):
    """The training images of `data` whose given label the out-of-fold probabilities contradict, most suspect
    first (a tlearn.evaluate.suspects.SuspectReport; see tlearn.train.label_check)."""
    from tlearn.train.label_check import suspect_labels as rank

    return rank(data, model, ranked_by=ranked_by, cache_dir=cache_dir, progress=progress)
