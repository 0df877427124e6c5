"""Stage 2 of the finetune recipe on a whole dataset, and the honest rule that decides which stage a model keeps.

    carve an inner split from train -> prepare inputs (cached trunk activations, or images) -> refit the head
    without the inner split -> fine-tune from it -> score both stages on the inner split -> score val and test

Val (and test) are only reported: the stage, the epoch and the head's strength are all chosen on the inner split.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tlearn.backbones import BackboneSpec
from tlearn.data import Dataset
from tlearn.train.finetune import FinetuneResult, FinetuneSettings
from tlearn.train.head import ImageNetPrior, LinearHead
from tlearn.train.inner import describe_inner_split, inner_split, val_score

STAGES = ("head", "finetune")


@dataclass
class StageChoice:
    """Which stage the bundle keeps, chosen on an inner split carved from train (never on the reported val)."""

    chosen: str  # "head" or "finetune"
    split: str  # how the inner split was made, in words
    images: int  # images in the inner split
    scores: dict[str, dict[str, float]]  # stage -> {"accuracy": ..., "log_loss": ...} on the inner split

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TunedStage:
    result: FinetuneResult
    logits: dict[str, np.ndarray]  # per scored split (val, test): float32 (n, classes), uncalibrated
    labels: dict[str, np.ndarray]  # of the images that decoded, in order
    paths: dict[str, list[Path]]  # the images that decoded, in order
    choice: StageChoice
    inner: tuple[np.ndarray, np.ndarray]  # the tuned model's logits on the inner split and their labels: its
    # temperature is fitted there (no reported split chooses or fits anything)


def fine_tune_stage(dataset: Dataset, spec: BackboneSpec, backbone, head: LinearHead, settings: FinetuneSettings,
                    run_dir: Path | None, *, resume: bool = False, seed: int = 0, workers: int | None = None,
                    batch_size: int = 32, progress: bool = True, cache_dir: Path | None = None) -> TunedStage:
    """Fine-tune `backbone` (changed in place) with a head on top, and choose between it and the head alone.

    The head is refitted without the inner split, so both stages are scored on images neither learned from.
    Checkpoints and logs go to `run_dir` (a temporary folder, removed afterwards, when None); trunk activations
    to `cache_dir` (default: the feature cache's folder).
    """
    import lightning as L

    from tlearn.classifier import Classifier
    from tlearn.train.finetune import (
        FinetuneModule,
        class_weights,
        fine_tune,
        plain_batch_norm,
        predict_logits,
        resolve_precision,
        resolve_unfreeze,
    )
    from tlearn.train.stage_inputs import prepare_inputs

    labels = dataset.labels("train")
    inner = inner_split(labels, settings.inner_fraction, seed)
    L.seed_everything(seed, workers=True, verbose=False)
    unfrozen = resolve_unfreeze(settings.unfreeze, spec.unfreeze_hint)
    weights = class_weights(labels[~inner], len(dataset.classes), settings.imbalance_ratio)
    # the tuned network's head learns from the features alone: the ImageNet prior (where the stage-1 head has one)
    # is the frozen backbone's classifier, which does not fit tuned features; its weights are set below
    start = head if head.prior is None else LinearHead(np.zeros((len(dataset.classes), head.weight.shape[1]
                                                                  - head.prior.weight.shape[0]), np.float32),
                                                        np.zeros(len(dataset.classes), np.float32))
    module = FinetuneModule(Classifier.from_head(backbone, start), len(dataset.classes), settings, unfrozen, weights)
    inputs = prepare_inputs(module, dataset, spec, inner, settings, unfrozen, workers=workers, batch_size=batch_size,
                            progress=progress, cache_dir=cache_dir)
    head_inner = _refit_head(inputs.frozen_features, inputs.frozen_labels, len(dataset.classes))
    module.model.head.weight.data.copy_(_tensor(head_inner.weight))
    module.model.head.bias.data.copy_(_tensor(head_inner.bias))
    # the head stage is scored as it would ship: with the ImageNet prior where the stage-1 head has it
    shipped = head_inner if head.prior is None else _refit_head(inputs.frozen_features, inputs.frozen_labels,
                                                                len(dataset.classes), head.prior)
    head_scores = val_score(shipped.logits(inputs.frozen_features["inner"]), inputs.frozen_labels["inner"])

    folder = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="tlearn-run-"))
    precision = resolve_precision(settings.precision, settings.accelerator, inputs.cut is not None)
    result = fine_tune(module, inputs.stage, settings, folder, precision=precision, unfrozen=unfrozen,
                       resume=resume, progress=progress)
    if not run_dir:  # nobody asked to keep checkpoints and logs
        shutil.rmtree(folder, ignore_errors=True)
    result.notes.extend(inputs.notes)
    logits = {split: predict_logits(module, data, batch_size) for split, data in inputs.scored.items()}
    inner_logits = logits.pop("inner")
    tuned_scores = val_score(inner_logits, inputs.scored_labels["inner"])
    choice = StageChoice(
        "finetune" if tuned_scores > head_scores else "head",
        describe_inner_split(settings.inner_fraction, seed) + "; head refitted without it",
        int(inner.sum()), {stage: {"accuracy": a, "log_loss": -nl}
                           for stage, (a, nl) in zip(STAGES, (head_scores, tuned_scores))})
    result.model = plain_batch_norm(result.model)
    return TunedStage(result, logits, {s: inputs.scored_labels[s] for s in logits},
                      {s: inputs.scored_paths[s] for s in logits}, choice,
                      (np.asarray(inner_logits, np.float64), inputs.scored_labels["inner"]))


def _refit_head(features: dict[str, np.ndarray], labels: dict[str, np.ndarray], n_classes: int,
                prior: ImageNetPrior | None = None) -> LinearHead:
    """The head fitted on train without the inner split, its strength chosen on the inner split (with `prior`
    beside the features, when given)."""
    from tlearn.train.head import balanced_class_weight, fit_head, head_inputs

    y = labels["train"]
    fitted = fit_head(head_inputs(features["train"], prior), y, head_inputs(features["inner"], prior),
                      labels["inner"], n_classes, class_weight=balanced_class_weight(y, n_classes)).head
    return LinearHead(fitted.weight, fitted.bias, prior)


def _tensor(array: np.ndarray):
    import torch

    return torch.from_numpy(np.asarray(array, np.float32))
