"""A trained model measured on a labelled dataset, through its Predictor (features from the cache when present)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tlearn.data import Dataset, find_dataset
from tlearn.data.decode import content_hashes
from tlearn.data.layout import Sample, trained_content
from tlearn.errors import DatasetError
from tlearn.evaluate import classification_metrics
from tlearn.evaluate.metrics import ScoredSplit
from tlearn.features import FeatureCache
from tlearn.features.views import extract_views
from tlearn.predict import Predictor

EVALUATION_SPLITS = ("auto", "test", "val", "train", "all")


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` scored: which images of the folder, chosen how, and those it left out."""

    scored: ScoredSplit
    split: str  # test, val, train or all (what "auto" became)
    how: str  # why these images, in words
    left_out: int  # images of the folder whose content trained the model: not scored
    checked: bool  # whether the model's training images were known (False: an old model folder, its data gone)
    training_folder: bool  # whether the folder is the one the model was trained on (see evaluate_dataset)

    def to_dict(self) -> dict:
        return {"split": self.split, "how": self.how, "left_out_trained": self.left_out,
                "training_images_known": self.checked, "training_folder": self.training_folder}


def score_dataset(predictor: Predictor, data: str | Path, splits: Sequence[str], cache_dir: str | Path | None = None,
                  progress: bool = True) -> dict[str, ScoredSplit]:
    """Per-image labels and uncalibrated logits of `splits` of `data`, split as the model's training split it
    (same seed and fractions). With several splits asked, those the dataset lacks are left out."""
    dataset = _find(predictor, data, cache_dir, carve=True, home=_recorded_root(predictor, Path(data).expanduser()))
    scored = {}
    for split in splits:
        if split not in dataset.splits and len(splits) > 1:
            continue  # e.g. no test split: score what there is
        # a split the dataset lacks is a DatasetError that names the ones it has
        scored[split] = score_samples(predictor, dataset, split, dataset.split(split), cache_dir, progress)
    return scored


def evaluate_dataset(predictor: Predictor, data: str | Path, split: str = "auto",
                     cache_dir: str | Path | None = None, progress: bool = True) -> Evaluation:
    """Score `split` of `data` (see EVALUATION_SPLITS), never on an image that trained the model.

    The training folder is `data` when it is where the model was trained (an absolute path recorded), or when it
    holds every training image (by content: moved, copied or reached by another path). "auto" scores its test split
    (val when there is none), split as training split it (seed, fractions, relabel file); any other folder is new
    data, taken as it lies (nothing carved), and all of its images are scored ("all"). Images whose content trained
    the model (SHA-256, under any name) are left out and counted, except from the training folder's own train
    split, scored as asked (a training-set figure).
    DatasetError when nothing is left to score."""
    check_split(split)
    trained, known = _trained_content(predictor)
    home, whole = _recorded_root(predictor, Path(data).expanduser()), None
    if not home:  # known by content instead (moved, copied, another path): the folder as it lies, every file hashed
        whole = _find(predictor, data, cache_dir, carve=False)
        home = bool(trained) and trained <= {trained_content(h) for h in whole.hashes.values()}
    # a second find reads every file again: only where the training split's carving is needed
    dataset = whole if whole is not None and not home and split in ("auto", "all") else _find(
        predictor, data, cache_dir, carve=True, home=home)
    if split == "auto":  # the training folder's test (or val) split, as training split it; anything else: all of it
        split = next((s for s in ("test", "val") if s in dataset.splits), "all") if home else "all"
    samples = ([s for name in dataset.splits for s in dataset.splits[name]] if split == "all"
               else dataset.split(split))
    left_out = 0
    if not (split == "train" and home):
        kept = [s for s in samples if trained_content(dataset.hashes.get(s.path, "")) not in trained]
        left_out, samples = len(samples) - len(kept), kept
    if not samples:
        raise DatasetError(f"nothing to evaluate in {dataset.root}: every image of "
                           f"{'it' if split == 'all' else f'its {split} split'} trained this model")
    where = "the folder the model was trained on" if home else "a folder other than the one it was trained on"
    how = f"every image of {where}" if split == "all" else f"the {split} split of {where}"
    return Evaluation(score_samples(predictor, dataset, split, samples, cache_dir, progress), split, how, left_out,
                      known, home)


def check_split(split: str) -> None:
    """DatasetError naming the choices for a split `evaluate` does not know (before any work)."""
    if split not in EVALUATION_SPLITS:
        raise DatasetError(f"unknown split {split!r}: choose one of {', '.join(EVALUATION_SPLITS)}")


def score_samples(predictor: Predictor, dataset: Dataset, name: str, samples: Sequence[Sample],
                  cache_dir: str | Path | None = None, progress: bool = True) -> ScoredSplit:
    """The labels and uncalibrated logits of `samples` of `dataset` (features from the cache when present)."""
    bundle = predictor.bundle
    # each view's features are cached on their own (a model with tta sees their mean)
    views = ("image", "mirror") if bundle.tta else ("image",)
    paths = [s.path for s in samples]
    labels = np.array([s.label for s in samples], dtype=np.int64)
    hashes = [dataset.hashes.get(p) for p in paths]  # found with the dataset: no file is read twice
    with FeatureCache(bundle.backbone.feature_key, cache_dir) as cache:
        features = extract_views(paths, cache, lambda: lambda pixels: predictor.view_features(pixels, "image"),
                                 bundle.preprocessing, views, description=name, batch_size=predictor.batch_size,
                                 workers=predictor.workers, progress=progress,
                                 hashes=hashes if all(hashes) else None)
    return ScoredSplit(name, [paths[i] for i in features.kept], labels[features.kept],
                       bundle.head().logits(features.mean()).astype(np.float64))


def _find(predictor: Predictor, data: str | Path, cache_dir: str | Path | None, carve: bool,
          home: bool = False) -> Dataset:
    """`data` with the model's classes: split as training split it (`carve`: its seed, fractions and, for the
    training folder itself (`home`), its relabel file when still there), or as it lies (nothing carved); val/ and
    test/ folders without a train/ one are accepted (new data to score)."""
    bundle = predictor.bundle
    training = bundle.training
    relabel = training.get("relabel") if home and carve else None
    relabel = relabel if relabel and Path(relabel).is_file() else None
    fractions = (training.get("val_fraction", 0.15), training.get("test_fraction", 0.15)) if carve else (0.0, 0.0)
    dataset = find_dataset(data, training.get("seed", 0), *fractions, cache_dir=cache_dir, evaluation_only=True,
                           relabel=relabel)
    if dataset.classes != bundle.classes:
        raise DatasetError(f"{dataset.root} has classes {dataset.classes}, but the model was trained on "
                           f"{bundle.classes}")
    return dataset


def _recorded_root(predictor: Predictor, root: Path) -> bool:
    """Whether `root` is the training folder's recorded path (only an absolute one says where it was)."""
    recorded = predictor.bundle.extra.get("data_checks", {}).get("root")
    try:
        return recorded is not None and Path(recorded).is_absolute() and Path(recorded).resolve() == root.resolve()
    except OSError:
        return False


def _trained_content(predictor: Predictor) -> tuple[set[str], bool]:
    """The content of the model's training images, and whether it is known: recorded with the split since this
    was kept; for an older model folder, read from its training files where they still are (all of them)."""
    split = predictor.bundle.split
    if "train_content" in split:
        return set(split["train_content"]), True
    files = predictor.bundle.split_files("train")
    found = {trained_content(h) for h in content_hashes(files).values() if h}
    return found, bool(files)


def metrics_of(scored: ScoredSplit, classes: list[str], seed: int = 0) -> dict:
    return classification_metrics(scored.labels, scored.logits.argmax(1), classes, seed)
