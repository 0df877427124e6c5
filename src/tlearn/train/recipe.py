"""Stage 2 of the finetune recipe on a whole dataset: decode every split once, fine-tune the network that the
stage-1 head sits on, score val and test; and the rule that decides which stage a model keeps."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tlearn.backbones import BackboneSpec
from tlearn.data import Dataset
from tlearn.train.finetune import FinetuneResult, FinetuneSettings, fine_tune, predict_logits
from tlearn.train.head import LinearHead


@dataclass
class TunedStage:
    result: FinetuneResult
    logits: dict[str, np.ndarray]  # per scored split (val, test): float32 (n, classes), uncalibrated
    labels: dict[str, np.ndarray]  # of the images that decoded, in order
    paths: dict[str, list[Path]]  # the images that decoded, in order


def fine_tune_stage(dataset: Dataset, spec: BackboneSpec, backbone, head: LinearHead, settings: FinetuneSettings,
                    run_dir: Path | None, *, resume: bool = False, seed: int = 0, workers: int | None = None,
                    batch_size: int = 32, progress: bool = True) -> TunedStage:
    """Fine-tune `backbone` (changed in place) with `head` on top; checkpoints and logs go to `run_dir` (a
    temporary folder, removed afterwards, when None)."""
    from tlearn.classifier import Classifier
    from tlearn.data.decoded import decode_resized

    prep = spec.preprocessing
    images = {split: decode_resized(dataset.paths(split), dataset.labels(split), prep.resize_size(),
                                    prep.interpolation, workers, progress, split) for split in dataset.splits}
    folder = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="tlearn-run-"))
    result = fine_tune(Classifier.from_head(backbone, head), prep, images["train"], images["val"], settings,
                       spec.unfreeze_hint, folder, resume=resume, seed=seed, progress=progress)
    if not run_dir:  # nobody asked to keep checkpoints and logs
        shutil.rmtree(folder, ignore_errors=True)
    scored = [split for split in ("val", "test") if split in images]
    return TunedStage(result, {s: predict_logits(result.model, images[s], prep, batch_size) for s in scored},
                      {s: images[s].labels for s in scored},
                      {s: _decoded_paths(dataset.paths(s), images[s]) for s in scored})


def val_score(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, -log loss) on val: the stage with the larger score is kept."""
    from scipy.special import softmax
    from sklearn.metrics import log_loss

    proba = softmax(np.asarray(logits, np.float64), axis=1)
    return float((proba.argmax(1) == y).mean()), -float(log_loss(y, proba, labels=list(range(proba.shape[1]))))


def _decoded_paths(paths: list[Path], images) -> list[Path]:
    """The files of `paths` that decoded, in order (DecodedImages keeps the failures, not the successes)."""
    failed = {Path(p) for p, _ in images.failures}
    return [p for p in paths if Path(p) not in failed]
