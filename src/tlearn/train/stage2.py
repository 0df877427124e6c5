"""The fine-tune step of the recipe: tune the top of the backbone from the stage-1 head, keep the better stage,
and measure the kept model exactly as prediction will run it (its exported engine, the one pixel pipeline), so
that `tlearn evaluate` reproduces its metrics.json.
"""
from __future__ import annotations

import copy

import numpy as np

from tlearn.data import Dataset
from tlearn.evaluate import classification_metrics
from tlearn.evaluate.metrics import ScoredSplit
from tlearn.features import FeatureCache, extract_features
from tlearn.features.backbone import FrozenBackbone
from tlearn.train.head import HeadFit, LinearHead
from tlearn.train.settings import TrainSettings
from tlearn.train.steps import SplitFeatures, TrainResult, adopt_weights, attach_engine, calibrate_bundle


def fine_tune_bundle(result: TrainResult, dataset: Dataset, backbone: FrozenBackbone, fit: HeadFit,
                     split: SplitFeatures, settings: TrainSettings, resume: bool) -> None:
    """Stage 2 from the stage-1 head; the bundle becomes the stage chosen by the fine-tune recipe, both recorded."""
    from tlearn.train.recipe import fine_tune_stage

    bundle, classes = result.bundle, dataset.classes
    # a copy: the stage-1 bundle's tensors are views of the network's, and must stay as they are
    tuned = fine_tune_stage(dataset, backbone.spec, copy.deepcopy(backbone.network()), fit.head, settings.finetune,
                            settings.run_dir, resume=resume, seed=settings.seed, workers=settings.workers,
                            batch_size=settings.batch_size, progress=settings.progress,
                            cache_dir=settings.cache_dir)
    # chosen on an inner split of train: the val figures reported stay untouched by the choice
    chosen = tuned.choice.chosen
    stages = {"head": {s: m for s, m in bundle.metrics.items() if s in ("val", "test")},
              "finetune": {s: classification_metrics(tuned.labels[s], x.argmax(1), classes, settings.seed)
                           for s, x in tuned.logits.items()}}
    network = tuned.result.model
    if chosen == "finetune":
        adopt_weights(bundle, network.numpy_state())
        prior = bundle.training["head"].get("imagenet_prior")
        if prior and prior.get("used"):  # the tuned network's head has the features alone (tlearn.train.recipe)
            bundle.training["head"]["imagenet_prior"] = {**prior, "used": False, "dropped_by": "finetune",
                                                         "note": "the fine-tuned network's head uses its features "
                                                                 "alone (the stage-1 head had the prior)"}
        # the views were chosen for the frozen head: the tuned network predicts (and is measured) on the image alone
        bundle.tta = False
        bundle.training["views"] = {**bundle.training["views"], "tta": False, "forwards_per_image": 1,
                                    "note": "the fine-tuned model predicts on the image alone"}
        with FeatureCache(bundle.backbone.feature_key, settings.cache_dir) as cache:
            tuned_backbone = FrozenBackbone(backbone.spec, backbone.info, cache.key, cache, engine=settings.engine,
                                            precision=settings.precision,
                                            calibration_paths=backbone.calibration_paths, seed=settings.seed,
                                            workers=settings.workers, progress=settings.progress,
                                            network=network.backbone)
            _measure_as_predicted(result, dataset, tuned_backbone, settings, tuned.inner)
            attach_engine(bundle, tuned_backbone.exported())
        stages["finetune"] = {s: m for s, m in bundle.metrics.items() if s in ("val", "test")}
    else:
        attach_engine(bundle, backbone.exported())
    run = tuned.result
    bundle.training["recipe"] = chosen
    bundle.training["finetune"] = {
        **settings.finetune.to_dict(), "chosen": chosen, "precision_used": run.precision, "unfrozen": run.unfrozen,
        "class_weights": run.class_weights, "best_epoch": run.best_epoch, "epochs_run": len(run.history),
        "seconds": run.seconds, "run_dir": str(settings.run_dir) if settings.run_dir else None,
        "choice": tuned.choice.to_dict(), "inputs": run.inputs, "notes": run.notes}
    bundle.metrics = {**bundle.metrics, "stages": stages}
    bundle.extra["history"] = run.history
    result.summary.recipe, result.summary.finetune = chosen, bundle.training["finetune"]


def _measure_as_predicted(result: TrainResult, dataset: Dataset, backbone: FrozenBackbone,
                          settings: TrainSettings, inner: tuple[np.ndarray, np.ndarray]) -> None:
    """Metrics of the tuned model from its exported engine on the pipeline's pixels; its temperature fitted on the
    inner split that chose its epoch (the reported splits are only measured)."""
    bundle = result.bundle
    head = LinearHead(bundle.state["head.weight"], bundle.state["head.bias"])
    logits, labels, paths = {}, {}, {}
    for split in (s for s in ("val", "test") if s in dataset.splits):
        features = extract_features(dataset.paths(split), backbone.cache, backbone.engine,
                                    backbone.spec.preprocessing, batch_size=settings.batch_size,
                                    workers=settings.workers, progress=settings.progress,
                                    description=f"{split} (fine-tuned)")
        logits[split] = head.logits(features.vectors).astype(np.float64)
        labels[split] = dataset.labels(split)[features.kept]
        paths[split] = [dataset.paths(split)[i] for i in features.kept]
    bundle.metrics = {**{s: classification_metrics(labels[s], x.argmax(1), dataset.classes, settings.seed)
                         for s, x in logits.items()}, "leaks": bundle.metrics["leaks"], "cv": bundle.metrics["cv"]}
    result.scored = SplitFeatures({}, {}, labels, paths).scored(logits)
    inner_logits, inner_labels = inner
    result.fitted = ScoredSplit("inner split (fine-tune)", [], inner_labels, inner_logits)
    calibrate_bundle(result)
