"""Suspect labels of a dataset: from a trained model's out_of_fold.csv when it was made from exactly these files
and labels, otherwise from a cross-validated head fitted now on the cached features (seconds on a warm cache).
The counting itself is tlearn.evaluate.suspects (numpy)."""
from __future__ import annotations

from pathlib import Path

from tlearn.bundle import Bundle, OutOfFold
from tlearn.data import find_dataset
from tlearn.errors import BundleError
from tlearn.evaluate.suspects import SuspectReport, find_suspects
from tlearn.train.settings import TrainSettings


def default_model_folder(data: str | Path) -> Path:
    """Where `tlearn train DATA` writes its model when not told (./<data folder name>-model)."""
    return Path(f"{Path(data).resolve().name}-model")


def suspect_labels(data: str | Path, model: str | Path | None = None, *, ranked_by: str = "self_confidence",
                   cache_dir: str | Path | None = None, progress: bool = True) -> SuspectReport:
    """Rank the training images of `data` whose given label the out-of-fold probabilities contradict.

    `model`: a model folder trained on `data`; its out_of_fold.csv is used when its rows are exactly the training
    files and labels `data` holds now (so a relabelled or grown dataset is looked at afresh). Without `model`, the
    folder `tlearn train DATA` writes by default is tried the same way. Otherwise the head is cross-validated now."""
    why_not = ""
    candidate = Path(model) if model is not None else default_model_folder(data)
    if model is not None or candidate.is_dir():
        try:
            bundle = Bundle.load(candidate, tensors=False)
            oof = bundle.read_out_of_fold()
            if oof is None:
                why_not = f"{candidate} has no out_of_fold.csv (trained before tlearn kept one)"
            else:
                why_not = _mismatch(oof, data, bundle, cache_dir)
                if not why_not:
                    return find_suspects(oof.classes, oof.paths, oof.labels, oof.proba, ranked_by,
                                         f"out-of-fold probabilities of {candidate}")
        except BundleError as exc:
            if model is not None:
                raise
            why_not = f"{candidate} could not be read ({exc})"
    from tlearn.train.steps import cross_validate

    settings = TrainSettings(cache_dir=Path(cache_dir) if cache_dir else None, progress=progress)
    _, oof = cross_validate(data, settings)
    fitted = (f"a head on {settings.backbone} features, cross-validated now "
              f"({len(set(oof.folds.tolist()))} folds)")
    return find_suspects(oof.classes, oof.paths, oof.labels, oof.proba, ranked_by,
                         fitted + (f"; {why_not}" if why_not else ""))


def _mismatch(oof: OutOfFold, data: str | Path, bundle: Bundle, cache_dir: str | Path | None) -> str:
    """Why the model's out-of-fold rows are not those of `data`'s training images now ("" when they are)."""
    training = bundle.training
    dataset = find_dataset(data, int(training.get("seed", 0)), float(training.get("val_fraction", 0.0)),
                           float(training.get("test_fraction", 0.15)), cache_dir=cache_dir)
    if dataset.classes != oof.classes:
        return "the model's classes are not the dataset's"
    now = {(str(s.path.relative_to(dataset.root)), s.label) for s in dataset.splits["train"]}
    then = set(zip(oof.paths, oof.labels.tolist()))
    if now != then:
        return (f"the model's out_of_fold.csv is for other training files or labels ({len(now ^ then)} rows "
                "differ): the head was cross-validated again")
    return ""
