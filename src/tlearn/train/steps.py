"""The training recipe's named steps: find data -> check -> extract -> choose (cross-validation on train) -> refit
the head on all of train -> calibrate (out of fold) -> package. tlearn.train.fit composes them (with the backbone
choice before and the fine-tune after); each is a short function a reader can follow on its own, and none of them
calls back into the recipe. Val and test, where present, only report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.backbones import get_spec, locate_weights, state_sha256
from tlearn.bundle import BackboneRecord, Bundle, EngineRecord, OutOfFold
from tlearn.data import Dataset, find_dataset
from tlearn.data.doctor import DoctorReport, quick_check
from tlearn.device import DeviceChoice
from tlearn.errors import DatasetError
from tlearn.evaluate import classification_metrics
from tlearn.evaluate.calibration import calibrate
from tlearn.evaluate.metrics import ScoredSplit
from tlearn.features import FeatureCache, feature_key
from tlearn.features.backbone import FrozenBackbone
from tlearn.features.views import ViewFeatures, extract_views
from tlearn.train.choices import ChoiceStore, HeadChoice, PriorChoice, choose_prior, make_folds, refit
from tlearn.train.head import HeadFit
from tlearn.train.settings import TrainSettings
from tlearn.train.views import ViewChoice, choose_views, needs_mirror

# "auto" fine-tunes when there is room above the head (cross-validated) and enough images per class to learn from
AUTO_MIN_TRAIN_PER_CLASS, AUTO_HEAD_GOOD_ENOUGH = 20, 0.995


@dataclass
class FoundData:
    dataset: Dataset
    hashes: dict[Path, str | None]  # content hash of every file (None: unreadable), read once
    checks: DoctorReport


@dataclass
class SplitFeatures:
    features: dict[str, ViewFeatures]
    xs: dict[str, np.ndarray]  # the image's features
    ys: dict[str, np.ndarray]
    paths: dict[str, list[Path]]  # of the rows of xs
    mirrors: dict[str, np.ndarray] = field(default_factory=dict)  # its mirror's, on the same rows, when extracted

    def eval_rows(self, split: str, views: ViewChoice) -> np.ndarray:
        """The features of `split` as the model will see them at prediction."""
        return views.recipe.eval_rows(self.xs[split], self.mirrors.get(split))

    def scored(self, logits: dict[str, np.ndarray]) -> dict[str, ScoredSplit]:
        return {s: ScoredSplit(s, self.paths[s], self.ys[s], logits[s]) for s in ("val", "test") if s in logits}


@dataclass
class TrainSummary:
    """What a train did, for people: the CLI prints this."""

    data: str
    layout: str
    classes: int
    images: dict[str, int]  # readable images per split
    skipped_files: list[tuple[str, str]]
    ignored_files: list[str]
    extracted: int
    from_cache: int
    extract_seconds: float
    engine_build_seconds: float
    head_C: float
    recipe: str  # the stage kept: head or finetune
    cv: dict | None = None  # how the head was chosen: folds, metric, score, class weighting, out-of-fold figures
    backbone_choice: dict | None = None  # --backbone auto: each backbone tried, its inner-split score and seconds
    seconds: float = 0.0
    finetune: dict | None = None
    device: dict | None = None  # where the network ran, and why there (tlearn.device)

    @property
    def images_per_second(self) -> float | None:
        return self.extracted / self.extract_seconds if self.extracted and self.extract_seconds else None


@dataclass
class TrainResult:
    bundle: Bundle
    summary: TrainSummary
    scored: dict[str, ScoredSplit] = field(default_factory=dict)  # per-image results of the kept model
    fitted: ScoredSplit | None = None  # what the temperature is fitted on: out-of-fold train, or the tuned inner split
    # the bundle's engine and feature-map engine as this train opened them (None if it did not): a Predictor of
    # the bundle can start with them instead of compiling the same files again
    engine: object | None = None
    feature_map_engine: object | None = None


def find_data(data: str | Path, settings: TrainSettings) -> FoundData:
    """The dataset and its splits, each file's content hash (read once), and the checks that need no decoding."""
    dataset = find_dataset(data, settings.seed, settings.val_fraction, settings.test_fraction,
                           cache_dir=settings.cache_dir, relabel=settings.relabel)
    return FoundData(dataset, dataset.hashes, quick_check(dataset, dataset.hashes))


def feature_key_for(settings: TrainSettings) -> str:
    spec, info = get_spec(settings.backbone), locate_weights(settings.backbone, settings.weights)
    return feature_key(spec.architecture, info.sha256, spec.preprocessing, settings.precision)


def frozen_backbone(found: FoundData, settings: TrainSettings, cache: FeatureCache,
                    device: DeviceChoice | None = None) -> FrozenBackbone:
    info = locate_weights(settings.backbone, settings.weights)
    return FrozenBackbone(get_spec(settings.backbone), info, cache.key, cache, engine=settings.engine,
                          precision=settings.precision, calibration_paths=found.dataset.paths("train"),
                          seed=settings.seed, workers=settings.workers, progress=settings.progress, device=device)


def extract(found: FoundData, backbone: FrozenBackbone, cache: FeatureCache, settings: TrainSettings) -> SplitFeatures:
    """Features of every split (and of train's mirrors when the mirror setting may use them), from the cache where
    present; the engine is opened only if something is left."""
    dataset = found.dataset
    if settings.ray is not None:
        extract_on_ray(found, backbone, cache, settings)
    mirrored = ("train",) if needs_mirror(settings.mirror) else ()
    features = {split: _split_views(found, backbone, cache, settings, split, split in mirrored)
                for split in dataset.splits}
    ys = {split: dataset.labels(split)[f.kept] for split, f in features.items()}
    _check_trainable(dataset, ys)
    return SplitFeatures(features, {s: f.views["image"] for s, f in features.items()}, ys,
                         {s: [dataset.paths(s)[i] for i in f.kept] for s, f in features.items()},
                         {s: f.views["mirror"] for s, f in features.items() if "mirror" in f.views})


def choose_the_head(found: FoundData, backbone: FrozenBackbone, cache: FeatureCache, split: SplitFeatures,
                    settings: TrainSettings) -> tuple[ViewChoice, HeadChoice, HeadFit, PriorChoice]:
    """The views (with mirror auto), the ImageNet prior (auto), the head's strength and class weighting, by
    cross-validation on train (kept per content: a re-train on the same features reads the choice); then the head
    refitted on all of train. val's and test's mirrors are extracted when the model will predict with them."""
    y, classes = split.ys["train"], found.dataset.classes
    from tlearn.evaluate import painter  # the CLI's painter process computes the folds, when one is started

    folds = make_folds(y, found.dataset.train_groups()[split.features["train"].kept], classes, settings.seed,
                       store=cache.directory, split=painter.folds)
    store = ChoiceStore(cache.directory)
    views, choice, candidate = choose_views(settings.mirror, split.xs["train"], split.mirrors.get("train"), y, folds,
                                            len(classes), store)
    classifier = backbone.imagenet_classifier if settings.imagenet_prior != "off" else None
    choice, candidate, prior = choose_prior(settings.imagenet_prior, candidate, choice, y, folds, len(classes),
                                            classifier, store)
    add_mirrors(split, found, backbone, cache, settings, views)
    head = refit(candidate, y, choice, len(classes), store)
    return views, choice, HeadFit(head, choice.C, choice.search), prior


def add_mirrors(split: SplitFeatures, found: FoundData, backbone: FrozenBackbone, cache: FeatureCache,
                settings: TrainSettings, views: ViewChoice) -> None:
    """The mirrors of val and test too, when the model predicts with them (tta): it is measured as it predicts."""
    if not views.recipe.tta:
        return
    for name in (s for s in ("val", "test") if s in split.xs):
        features = _split_views(found, backbone, cache, settings, name, True)
        if not np.array_equal(features.kept, split.features[name].kept):  # both views decode the same files
            raise RuntimeError(f"the {name} images that decoded changed between two reads")
        split.features[name], split.mirrors[name] = features, features.views["mirror"]


def _split_views(found: FoundData, backbone: FrozenBackbone, cache: FeatureCache, settings: TrainSettings, split: str,
                 mirrored: bool) -> ViewFeatures:
    paths = found.dataset.paths(split)
    return extract_views(paths, cache, backbone.engine, backbone.spec.preprocessing,
                         ("image", "mirror") if mirrored else ("image",), description=split,
                         batch_size=settings.batch_size, workers=settings.workers, progress=settings.progress,
                         hashes=[found.hashes[p] for p in paths])


def extract_on_ray(found: FoundData, backbone: FrozenBackbone, cache: FeatureCache, settings: TrainSettings) -> None:
    """`--ray`: Ray actors compute the features not cached yet into the cache (the engine is exported and verified
    here first, once); the local extraction then finds every one of them cached."""
    from tlearn.distributed import extract_features_ray

    paths = [p for split in found.dataset.splits for p in found.dataset.paths(split)]
    extract_features_ray(paths, [found.hashes[p] for p in paths], backbone.engine_key, cache.engines,
                         backbone.spec.preprocessing, cache, settings.ray, engine=settings.engine,
                         precision=settings.precision, batch_size=settings.batch_size, export=backbone.engine,
                         progress=settings.progress)


def assemble(found: FoundData, backbone: FrozenBackbone, split: SplitFeatures, fit: HeadFit,
             settings: TrainSettings, views: ViewChoice, choice: HeadChoice, prior: PriorChoice) -> TrainResult:
    """The stage-1 bundle (backbone tensors + head, and the ImageNet classifier when the head uses it), its
    metrics on val and test, and the summary."""
    dataset, spec = found.dataset, backbone.spec
    state = {**{f"backbone.{k}": v for k, v in backbone.state.items()},
             **{f"head.{k}": v for k, v in fit.head.state().items()},
             **({f"prior.{k}": v for k, v in fit.head.prior.state().items()} if fit.head.prior else {})}
    failures = sorted({(str(p), r) for f in split.features.values() for p, r in f.failures} |
                      {(str(s.path), s.reason) for s in dataset.skipped})  # found on disk but not used
    record = BackboneRecord(spec.name, spec.architecture, backbone.info, int(split.xs["train"].shape[1]),
                            backbone.key, settings.precision)
    bundle = Bundle(classes=dataset.classes, backbone=record, preprocessing=spec.preprocessing, state=state,
                    training={**settings.record(), "recipe": "head",
                              "head": {"type": "linear-softmax on L2-normalised features", "C": fit.C,
                                       "class_weight": choice.class_weight,
                                       "chosen_by": f"{choice.folds.describe()}: {choice.metric}",
                                       "refit": f"all {len(split.ys['train'])} training images",
                                       "choice_seconds": round(choice.seconds, 3),
                                       "imagenet_prior": prior.to_dict(),
                                       "search": fit.search}, "views": views.to_dict()},
                    split=dataset.describe(), tta=views.recipe.tta,
                    extra={"skipped_files": [{"path": p, "reason": r} for p, r in failures],
                           "data_checks": found.checks.to_dict()})
    logits = {s: fit.head.logits(split.eval_rows(s, views)).astype(np.float64) for s in split.xs
              if s in ("val", "test")}
    bundle.metrics = {s: classification_metrics(split.ys[s], x.argmax(1), dataset.classes, settings.seed)
                      for s, x in logits.items()}
    cv = {**{k: v for k, v in choice.to_dict().items() if k not in ("search", "seconds")},  # timings: training
          **classification_metrics(split.ys["train"], choice.oof_logits.argmax(1), dataset.classes, settings.seed)}
    if choice.folds.note:
        cv["note"] = choice.folds.note
    bundle.metrics["cv"] = cv
    # near-duplicates across splits make val/test optimistic: counted with the figures they inflate
    bundle.metrics["leaks"] = dataset.describe_leaks()
    extracted = sum(f.computed for f in split.features.values())
    summary = TrainSummary(
        data=str(dataset.root), layout=dataset.layout, classes=len(dataset.classes),
        images={s: len(split.ys[s]) for s in split.ys}, skipped_files=failures,
        ignored_files=[str(p) for p in dataset.ignored], extracted=extracted,
        from_cache=sum(f.from_cache for f in split.features.values()),
        extract_seconds=sum(f.seconds for f in split.features.values()),
        engine_build_seconds=backbone.build_seconds, head_C=fit.C, recipe="head", cv=cv)
    fitted = ScoredSplit("out-of-fold train", split.paths["train"], split.ys["train"],
                         choice.oof_logits.astype(np.float64))
    return TrainResult(bundle, summary, split.scored(logits), fitted)


def calibrate_bundle(result: TrainResult) -> None:
    """Fit the temperature on `result.fitted` (out-of-fold train; val and test are only ever measured)."""
    calibration = calibrate(result.scored, result.fitted)
    result.bundle.temperature = calibration["temperature"]
    result.bundle.extra["calibration"] = calibration


def keep_out_of_fold(result: TrainResult, found: FoundData, split: SplitFeatures, choice: HeadChoice) -> None:
    """The training images' out-of-fold probabilities (calibrated) go into the model folder: out_of_fold.csv."""
    from tlearn.predict import softmax  # numpy: scipy.special costs a re-train 0.2 s to import

    root = found.dataset.root
    result.bundle.out_of_fold = OutOfFold(
        found.dataset.classes, [str(p.relative_to(root)) for p in split.paths["train"]], split.ys["train"],
        choice.folds.fold, softmax(choice.oof_logits.astype(np.float64) / result.bundle.temperature))


def wants_finetune(result: TrainResult, settings: TrainSettings) -> bool:
    if settings.recipe != "auto":
        return settings.recipe == "finetune"
    per_class = result.summary.images["train"] / result.summary.classes
    return per_class >= AUTO_MIN_TRAIN_PER_CLASS and result.bundle.metrics["cv"]["accuracy"] < AUTO_HEAD_GOOD_ENOUGH


def attach_engine(bundle: Bundle, exported) -> None:
    """The verified exported backbone goes into the model folder: loading and predicting need no torch."""
    bundle.engine = EngineRecord(exported.precision, exported.verdicts)
    bundle.engine_files = (exported.model_file, exported.reference_file)
    bundle.feature_map_file = exported.feature_map_file


def adopt_weights(bundle: Bundle, state: dict[str, np.ndarray]) -> None:
    """Fine-tuned weights into the bundle, with a feature-cache key of their own (stage-1 features no longer fit)."""
    bundle.state = dict(state)
    tuned = state_sha256(bundle.backbone_state())
    record = bundle.backbone
    bundle.backbone = BackboneRecord(record.name, record.architecture, record.weights, record.feature_dim,
                                     feature_key(record.architecture, tuned, bundle.preprocessing, record.precision),
                                     record.precision, tuned)


def _check_trainable(dataset: Dataset, ys: dict[str, np.ndarray]) -> None:
    for split in (s for s in ("train", "val") if s in ys):
        present = set(ys[split].tolist())
        lost = [c for i, c in enumerate(dataset.classes) if i not in present]
        if lost:
            raise DatasetError(f"no readable image left for class(es) {', '.join(lost)} in the {split} split "
                               "(every file failed to decode; see the skipped files)")


def cross_validate(data: str | Path, settings: TrainSettings) -> tuple[Dataset, OutOfFold]:
    """The out-of-fold probabilities of every training image of `data`, as a train would record them, without
    building a model: train's features (from the cache where present), the folds, the views and head chosen by
    them, the temperature fitted on the result. What `tlearn doctor --labels` ranks when no model matches."""
    from tlearn.evaluate.calibration import fit_temperature
    from tlearn.predict import softmax

    with FeatureCache(feature_key_for(settings), settings.cache_dir) as cache:
        found = find_data(data, settings)
        backbone = frozen_backbone(found, settings, cache)
        features = _split_views(found, backbone, cache, settings, "train", needs_mirror(settings.mirror))
        classifier = backbone.imagenet_classifier if settings.imagenet_prior != "off" else None
    dataset = found.dataset
    y = dataset.labels("train")[features.kept]
    _check_trainable(dataset, {"train": y})
    paths = [dataset.paths("train")[i] for i in features.kept]
    folds = make_folds(y, dataset.train_groups()[features.kept], dataset.classes, settings.seed,
                       store=cache.directory)
    store = ChoiceStore(cache.directory)
    _, choice, candidate = choose_views(settings.mirror, features.views["image"], features.views.get("mirror"), y,
                                        folds, len(dataset.classes), store)
    choice, _, _ = choose_prior(settings.imagenet_prior, candidate, choice, y, folds, len(dataset.classes), classifier,
                                store)
    logits = choice.oof_logits.astype(np.float64)
    temperature = fit_temperature(logits, y)
    return dataset, OutOfFold(dataset.classes, [str(p.relative_to(dataset.root)) for p in paths], y, folds.fold,
                              softmax(logits / temperature))
