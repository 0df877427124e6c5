"""Every choice a train makes on its cached features, by cross-validation on train: one module decides, every step
asks it. Val and test, where the data has them, only report.

    folds (stratified, seeded; near-duplicates in one fold) -> for each candidate (views, backbone):
    the head's strength C and class weighting on a regularisation path per fold -> out-of-fold probabilities
    -> the chosen candidate's temperature fitted on them -> the final head refitted on all of train

The folds come from scikit-learn's StratifiedGroupKFold; the heads are tlearn.train.head's (numpy and scipy), so a
re-train on cached features never imports torch. What was chosen is recorded (HeadChoice.to_dict) with the score
that chose it, and kept per content (ChoiceStore) so that a re-train on the same features does not choose again.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from tlearn.data.splits import K_FOLDS
from tlearn.errors import DatasetError, OutputError
from tlearn.train.head import HeadPath, ImageNetPrior, LinearHead, balanced_class_weight, fit_path, head_inputs

# inverse regularisation strengths, half a decade apart, strongest first: on oxford17flowers the best sits at
# 100-1000, on hymenoptera at 10-100, far outside a grid that stops at 100 for some data
C_GRID = tuple(float(10 ** (e / 2)) for e in range(-2, 9))  # 0.1 .. 10,000
PATIENCE = 2  # strengths past the best without a better cross-validated score: the path stops there
IMBALANCE = 1.5  # largest / smallest class in train above this: class weighting is a choice, scored balanced
CHOICES_VERSION = 1
FoldSplit = Callable[[list, list, int, int], "list | None"]  # (labels, groups, k, seed) -> each row's fold


@dataclass(frozen=True)
class Folds:
    """The fold of each train row, and how the folds were made."""

    fold: np.ndarray  # (n,) int, in 0..k-1
    k: int
    seed: int
    grouped: int  # rows that share a near-duplicate group with another row (kept in one fold)
    note: str = ""  # a line for the user when fewer folds than asked were possible

    def describe(self) -> str:
        grouped = f"; {self.grouped} near-duplicate images kept with their group" if self.grouped else ""
        return f"{self.k}-fold stratified cross-validation on train, seed {self.seed}{grouped}"

    def to_dict(self) -> dict:
        return {"k": self.k, "seed": self.seed, "grouped": self.grouped, "method": self.describe(),
                "note": self.note}


def make_folds(labels: np.ndarray, groups: np.ndarray | None, classes: list[str], seed: int,
               k: int = K_FOLDS, store: Path | None = None, split: FoldSplit | None = None) -> Folds:
    """Stratified k folds of train (group-aware: rows of one group share a fold). Fewer folds when the smallest
    class has fewer than k images (a note says so); a class with a single image is refused by name.

    `store`: a cache folder where the folds are kept by their inputs (labels, groups, seed, k, scikit-learn's
    version), so that a re-train on the same data reads them without importing scikit-learn (~1.3 s).
    `split`: who else can compute stratified_group_folds (the CLI's painter process, where scikit-learn is imported
    on a core of its own); None from it, or folds that do not fit, and they are computed here."""
    labels = np.asarray(labels, np.int64)
    counts = np.bincount(labels, minlength=len(classes))
    present = counts[counts > 0]
    if len(present) < 2:
        raise DatasetError("train has images of one class only: a classifier needs at least two classes")
    single = [classes[i] for i in np.flatnonzero(counts == 1)]
    if single:
        raise DatasetError(f"class {', '.join(repr(c) for c in single)} has a single training image: choosing by "
                           "cross-validation needs at least 2 per class (5 or more is better); add images or "
                           "remove the class")
    smallest = int(present.min())
    note = ""
    if smallest < k:
        small = [classes[i] for i in np.flatnonzero(counts == smallest)]
        note = (f"{smallest}-fold cross-validation instead of {k}: class {', '.join(repr(c) for c in small)} has "
                f"{smallest} training images")
        k = smallest
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups, np.int64)
    _, group_sizes = np.unique(groups, return_counts=True)
    grouped = int(group_sizes[group_sizes > 1].sum())
    path = _fold_file(store, labels, groups, seed, k)
    fold = _read_folds(path, labels, k) if path is not None else None
    if fold is None:
        given = split(labels.tolist(), groups.tolist(), k, seed) if split is not None else None
        fold = None if given is None else _checked_folds(np.asarray(given, np.int64), labels, k)
        if fold is None:
            fold = stratified_group_folds(labels, groups, k, seed)
        if path is not None:
            _write_folds(path, fold)
    return Folds(fold, k, seed, grouped, note)


def stratified_group_folds(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """scikit-learn's StratifiedGroupKFold(k, shuffled by `seed`): the held-out fold of each row."""
    from sklearn.model_selection import StratifiedGroupKFold

    fold = np.full(len(labels), -1, np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for i, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        fold[held] = i
    return fold


def _checked_folds(fold: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray | None:
    if fold.shape != labels.shape or fold.min(initial=0) < 0 or set(fold.tolist()) != set(range(k)):
        return None
    return fold


def _fold_file(store: Path | None, labels: np.ndarray, groups: np.ndarray, seed: int, k: int) -> Path | None:
    if store is None:
        return None
    from importlib.metadata import version

    digest = hashlib.sha256(f"tlearn-folds:1:{version('scikit-learn')}:{seed}:{k}".encode())
    digest.update(labels.tobytes())
    digest.update(groups.tobytes())
    return Path(store) / "folds" / f"{digest.hexdigest()[:32]}.json"


def _read_folds(path: Path, labels: np.ndarray, k: int) -> np.ndarray | None:
    """The kept folds, if the file is whole and fits (every row a fold in 0..k-1, every fold used)."""
    try:
        fold = np.asarray(json.loads(path.read_text()), np.int64)
    except (OSError, ValueError, TypeError):
        return None
    return _checked_folds(fold, labels, k)


def _write_folds(path: Path, fold: np.ndarray) -> None:
    from tlearn.files import write_atomically

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(fold.tolist())
        write_atomically(path, lambda tmp: Path(tmp).write_text(payload))
    except (OSError, OutputError):  # derived data: recomputed next time
        pass


@dataclass
class Candidate:
    """What one candidate (a view recipe, a backbone) puts in front of the head, for cross-validation: the
    training rows of a set of train images and the rows they are scored on."""

    name: str
    image: np.ndarray  # train's features
    mirrored: np.ndarray | None = None  # its mirrors' on the same rows (views that use them)
    train_mirror: bool = False
    tta: bool = False
    prior: ImageNetPrior | None = None  # the backbone's ImageNet probabilities beside the features
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def train_rows(self, rows: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.train_mirror:
            return self._inputs("image")[rows], y[rows]
        return (np.concatenate([self._inputs("image")[rows], self._inputs("mirror")[rows]]),
                np.concatenate([y[rows], y[rows]]))

    def eval_rows(self, rows: np.ndarray) -> np.ndarray:
        """The head's inputs of `rows` as prediction computes them (the mean of the views first, then the prior)."""
        return self._inputs("mean" if self.tta else "image")[rows]

    def _inputs(self, view: str) -> np.ndarray:
        """The head's inputs of every row for one view (image, mirror, or their mean), computed once: the prior's
        ImageNet classifier is a (rows x 1000 x features) product, too dear to repeat for every fold and strength."""
        if view not in self._memo:
            features = (self.image if view == "image" else self.mirrored if view == "mirror"
                        else (self.image + self.mirrored) / 2)
            self._memo[view] = head_inputs(features, self.prior)
        return self._memo[view]

    @property
    def width(self) -> int:
        """The number of inputs of this candidate's head."""
        return self.image.shape[1] + (0 if self.prior is None else self.prior.weight.shape[0])

    def with_prior(self, prior: ImageNetPrior) -> "Candidate":
        return Candidate(f"{self.name}+imagenet-prior-{prior.scale:g}", self.image, self.mirrored, self.train_mirror,
                         self.tta, prior)


@dataclass
class HeadChoice:
    """The head's strength and class weighting chosen by cross-validation, with its out-of-fold logits."""

    C: float
    class_weight: str  # "none" or "balanced"
    metric: str  # what chose: "log loss", or "class-balanced log loss" when the classes are imbalanced
    score: float  # the chosen head's cross-validated metric (lower is better)
    accuracy: float
    balanced_accuracy: float
    log_loss: float
    folds: Folds
    oof_logits: np.ndarray  # (n, classes) float32: each train image scored by the head of the folds without it
    search: list[dict] = field(default_factory=list)  # every (class_weight, C) tried and its scores
    seconds: float = 0.0
    candidate: str = ""

    def to_dict(self) -> dict:
        return {"C": self.C, "class_weight": self.class_weight, "chosen_by": f"cross-validated {self.metric}",
                "candidate": self.candidate,
                "score": self.score, "accuracy": self.accuracy, "balanced_accuracy": self.balanced_accuracy,
                "log_loss": self.log_loss, "folds": self.folds.to_dict(), "search": self.search,
                "seconds": round(self.seconds, 3)}

    def scores(self) -> dict:
        """The scores a candidate is compared by, as recorded in the model's config."""
        return {"log_loss": self.score, "accuracy": self.accuracy, "balanced_accuracy": self.balanced_accuracy,
                "C": self.C, "class_weight": self.class_weight}

    def key(self) -> tuple[float, float]:
        """Larger is better: the cross-validated log loss, then accuracy (balanced where the metric is)."""
        return -self.score, self.balanced_accuracy if "balanced" in self.metric else self.accuracy


def imbalanced(labels: np.ndarray, n_classes: int) -> bool:
    counts = np.bincount(labels, minlength=n_classes)
    counts = counts[counts > 0]
    return bool(counts.max() > IMBALANCE * counts.min())


def choose_head(candidate: Candidate, labels: np.ndarray, folds: Folds, n_classes: int,
                grid: tuple[float, ...] = C_GRID) -> HeadChoice:
    """The head's C (and, with imbalanced classes, its class weighting) by k-fold cross-validation: for each
    weighting, one regularisation path per fold walks up the grid; each strength is scored on every fold's held-out
    rows together, and a path stops PATIENCE strengths past its best.

    The score is the out-of-fold log loss (each class's mean, averaged, when the classes are imbalanced): a proper
    scoring rule, smooth in C, where accuracy on a few hundred images moves in steps of one image and ties over
    decades of C (measured: hymenoptera's folds tie at 0.9673 from C=1 to C=31.6)."""
    start = time.perf_counter()
    labels = np.asarray(labels, np.int64)
    skewed = imbalanced(labels, n_classes)
    metric = "class-balanced log loss" if skewed else "log loss"
    best: HeadChoice | None = None
    search: list[dict] = []
    for weighting in ("none", "balanced") if skewed else ("none",):
        paths, held = [], []
        for f in range(folds.k):
            rows, out = np.flatnonzero(folds.fold != f), np.flatnonzero(folds.fold == f)
            x, y = candidate.train_rows(rows, labels)
            weight = balanced_class_weight(y, n_classes) if weighting == "balanced" else None
            paths.append(HeadPath(x, y, n_classes, weight))
            held.append(out)
        stale = 0
        path_best = None
        for C in sorted(grid):
            logits = np.zeros((len(labels), n_classes), np.float32)
            for path, out in zip(paths, held):
                logits[out] = path.fit(C).logits(candidate.eval_rows(out))
            acc, bal, loss, balanced_loss = _scores(logits, labels, n_classes)
            score = balanced_loss if skewed else loss
            search.append({"class_weight": weighting, "C": C, "accuracy": acc, "balanced_accuracy": bal,
                           "log_loss": loss, "balanced_log_loss": balanced_loss})
            trial = HeadChoice(C, weighting, metric, score, acc, bal, loss, folds, logits, candidate=candidate.name)
            if path_best is None or trial.key() > path_best.key():
                path_best, stale = trial, 0
            else:
                stale += 1
                if stale >= PATIENCE:
                    break
        if best is None or path_best.key() > best.key():
            best = path_best
    best.search, best.seconds = search, time.perf_counter() - start
    return best


def _scores(logits: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[float, float, float, float]:
    """Accuracy, balanced accuracy (mean recall of the classes present), log loss, and the log loss averaged per
    class of `logits`."""
    from scipy.special import log_softmax

    logp = log_softmax(np.asarray(logits, np.float64), axis=1)
    hit, nll = logp.argmax(1) == labels, -logp[np.arange(len(labels)), labels]
    present = [c for c in range(n_classes) if (labels == c).any()]
    return (float(hit.mean()), float(np.mean([hit[labels == c].mean() for c in present])), float(nll.mean()),
            float(np.mean([nll[labels == c].mean() for c in present])))


def choose(candidates: list[Candidate], labels: np.ndarray, folds: Folds, n_classes: int) -> tuple[HeadChoice,
                                                                                                     list[HeadChoice]]:
    """The best candidate's head choice (the first, cheapest, of equals) and every candidate's."""
    tried = [choose_head(c, labels, folds, n_classes) for c in candidates]
    best = tried[0]
    for trial in tried[1:]:
        if trial.key() > best.key():
            best = trial
    return best, tried


def choose_kept(candidates: list[Candidate], labels: np.ndarray, folds: Folds, n_classes: int,
                store: ChoiceStore | None = None) -> tuple[HeadChoice, dict[str, dict]]:
    """`choose`, kept per content in `store` (a re-train on the same features reads the choice), with each
    candidate's scores by name."""
    key = ChoiceStore.key(candidates, labels, folds)
    cached = store.get(key, folds, len(labels), n_classes) if store is not None else None
    if cached is not None:
        choice, (scores,) = cached
        return choice, scores
    choice, tried = choose(candidates, labels, folds, n_classes)
    scores = {t.candidate: t.scores() for t in tried}
    if store is not None:
        store.put(key, choice, [scores])
    return choice, scores


PRIOR_SCALE = 0.5  # the ImageNet prior's block against the features' (both unit vectors): half as loud
PRIOR_SETTINGS = ("auto", "on", "off")


@dataclass
class PriorChoice:
    """Whether the head has the backbone's ImageNet probabilities beside its features (tlearn.train.head's
    ImageNetPrior), and the cross-validated scores that decided."""

    asked: str  # auto | on | off
    used: bool
    scale: float
    scores: dict[str, dict] = field(default_factory=dict)  # candidate -> out-of-fold scores, with and without
    note: str = ""
    gain: float | None = None  # how much lower the prior's out-of-fold loss is, paired image by image
    standard_error: float | None = None  # of that gain

    def to_dict(self) -> dict:
        return {"asked": self.asked, "used": self.used, "scale": self.scale, "scores": self.scores,
                "gain": self.gain, "standard_error": self.standard_error, "note": self.note}


def choose_prior(asked: str, candidate: Candidate, choice: HeadChoice, labels: np.ndarray, folds: Folds,
                 n_classes: int, classifier: tuple[np.ndarray, np.ndarray] | None,
                 store: ChoiceStore | None = None) -> tuple[HeadChoice, Candidate, PriorChoice]:
    """With `asked` auto, the head with the ImageNet prior beside the features is scored on the same folds as the
    head without it (`candidate`, `choice`), and kept when its out-of-fold log loss is lower by more than one
    standard error of the paired per-image difference (the one-standard-error rule: on a tie the simpler head wins;
    measured on blood-cell photos, the two differed by 7e-7); on: kept; off: not tried. `classifier`: the
    backbone's ImageNet classifier (weight, bias) on its pooled features, or None (the backbone has none: nothing to
    try)."""
    if asked not in PRIOR_SETTINGS:
        raise ValueError(f"imagenet_prior must be one of {', '.join(PRIOR_SETTINGS)}, not {asked!r}")
    if asked == "off":
        return choice, candidate, PriorChoice(asked, False, 0.0, note="not tried (off)")
    if classifier is None:
        return choice, candidate, PriorChoice(asked, False, 0.0, note="the backbone has no ImageNet classifier on "
                                                                       "its pooled features")
    with_prior = candidate.with_prior(ImageNetPrior(classifier[0], classifier[1], PRIOR_SCALE))
    tried, _ = choose_kept([with_prior], labels, folds, n_classes, store)
    scores = {c.candidate: c.scores() for c in (choice, tried)}
    gain, error = paired_gain(choice, tried, labels, n_classes)
    used = asked == "on" or gain > error
    kept = PriorChoice(asked, used, PRIOR_SCALE, scores,
                       f"kept when {folds.describe()} lowers the {choice.metric} by more than one standard error"
                       if asked == "auto" else "asked for (on)", gain, error)
    return (tried, with_prior, kept) if used else (choice, candidate, kept)


def paired_gain(base: HeadChoice, other: HeadChoice, labels: np.ndarray, n_classes: int) -> tuple[float, float]:
    """(mean, standard error) of how much lower `other`'s out-of-fold log loss is than `base`'s, image by image on
    the same folds (each class weighted equally where the choosing metric is class-balanced)."""
    labels = np.asarray(labels, np.int64)
    rows = np.arange(len(labels))

    def losses(choice: HeadChoice) -> np.ndarray:
        from scipy.special import log_softmax

        return -log_softmax(np.asarray(choice.oof_logits, np.float64), axis=1)[rows, labels]

    difference = losses(base) - losses(other)
    if "balanced" in base.metric:
        counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
        weight = 1.0 / (np.count_nonzero(counts) * counts[labels])
    else:
        weight = np.full(len(labels), 1.0 / len(labels))
    mean = float((weight * difference).sum())
    n = len(labels)
    error = float(np.sqrt((weight ** 2 * (difference - mean) ** 2).sum() * n / max(n - 1, 1)))
    return mean, error


def refit(candidate: Candidate, labels: np.ndarray, choice: HeadChoice, n_classes: int,
          store: ChoiceStore | None = None) -> LinearHead:
    """The head that ships: fitted on all of train at the chosen strength and weighting (along the same path of
    strengths the folds walked, so it starts where they did). `store` keeps it by content: a re-train on the same
    features and labels reads it instead of walking the path again."""
    key = None
    if store is not None and store.directory is not None:
        key = f"{ChoiceStore.key([candidate], labels, choice.folds)}-refit-{choice.C:g}-{choice.class_weight}"
        kept = store.get_head(key, n_classes, candidate.width)
        if kept is not None:
            return LinearHead(kept.weight, kept.bias, candidate.prior)
    head = _refit(candidate, labels, choice, n_classes)
    if key is not None:
        store.put_head(key, head)
    return head


def _refit(candidate: Candidate, labels: np.ndarray, choice: HeadChoice, n_classes: int) -> LinearHead:
    x, y = candidate.train_rows(np.arange(len(labels)), np.asarray(labels, np.int64))
    weight = balanced_class_weight(y, n_classes) if choice.class_weight == "balanced" else None
    head = None
    for _, head in fit_path(x, y, n_classes, [c for c in C_GRID if c <= choice.C] or [choice.C], weight):
        pass
    return LinearHead(head.weight, head.bias, candidate.prior)


def out_of_fold_temperature(choice: HeadChoice, labels: np.ndarray) -> dict:
    """The calibration temperature fitted on the out-of-fold logits (images no head saw while fitting)."""
    from tlearn.evaluate.calibration import fit_temperature

    errors = int((choice.oof_logits.argmax(1) != labels).sum())
    if not errors:  # the likelihood only grows as T -> 0: the data cannot say how sure to be
        return {"temperature": 1.0, "method": "none (no out-of-fold mistakes to learn from)",
                "fitted_on": "out-of-fold train"}
    return {"temperature": fit_temperature(choice.oof_logits, labels), "method": "temperature",
            "fitted_on": f"out-of-fold train ({choice.folds.k} folds)"}


# ---- kept per content: a re-train on the same cached features does not choose again ---------------------------
class ChoiceStore:
    """JSON files under CACHE/choices/, one per (candidates' features, labels, folds, grid): derived data, checked
    on reading (a file that does not parse or does not fit is ignored and written again)."""

    def __init__(self, directory: Path | None):
        self.directory = Path(directory) / "choices" if directory is not None else None

    @staticmethod
    def key(candidates: list[Candidate], labels: np.ndarray, folds: Folds) -> str:
        digest = hashlib.sha256(f"tlearn-choices:{CHOICES_VERSION}:{C_GRID}:{PATIENCE}:{IMBALANCE}".encode())
        for c in candidates:
            digest.update(f"{c.name}:{c.train_mirror}:{c.tta}".encode())
            if c.prior is not None:
                digest.update(c.prior.digest.encode())
            digest.update(np.ascontiguousarray(c.image, np.float32).tobytes())
            if c.mirrored is not None and (c.train_mirror or c.tta):
                digest.update(np.ascontiguousarray(c.mirrored, np.float32).tobytes())
        digest.update(np.ascontiguousarray(labels, np.int64).tobytes())
        digest.update(np.ascontiguousarray(folds.fold, np.int64).tobytes())
        return digest.hexdigest()[:32]

    def get(self, key: str, folds: Folds, n_rows: int, n_classes: int) -> tuple[HeadChoice, list[dict]] | None:
        if self.directory is None:
            return None
        path = self.directory / f"{key}.json"
        try:
            data = json.loads(path.read_text())
            logits = np.asarray(data["oof_logits"], np.float32)
            if logits.shape != (n_rows, n_classes) or not np.isfinite(logits).all():
                return None
            c = data["choice"]
            choice = HeadChoice(float(c["C"]), str(c["class_weight"]), str(c["metric"]), float(c["score"]),
                                float(c["accuracy"]), float(c["balanced_accuracy"]), float(c["log_loss"]), folds,
                                logits, list(c["search"]), float(c["seconds"]), str(c["candidate"]))
            return choice, list(data["candidates"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def get_head(self, key: str, n_classes: int, n_features: int) -> LinearHead | None:
        """A refitted head kept under `key` (an .npz of two float32 arrays, read without pickle), if it fits."""
        try:
            with np.load(self.directory / f"{key}.npz", allow_pickle=False) as data:
                weight, bias = np.asarray(data["weight"], np.float32), np.asarray(data["bias"], np.float32)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if weight.shape != (n_classes, n_features) or bias.shape != (n_classes,) or not (
                np.isfinite(weight).all() and np.isfinite(bias).all()):
            return None
        return LinearHead(weight, bias)

    def put_head(self, key: str, head: LinearHead) -> None:
        from tlearn.files import write_atomically

        def save(tmp: str) -> None:
            with open(tmp, "wb") as handle:  # a file object: np.savez would add ".npz" to a name
                np.savez(handle, weight=head.weight, bias=head.bias)

        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomically(self.directory / f"{key}.npz", save)
        except (OSError, OutputError):  # derived data: refitted next time
            pass

    def put(self, key: str, choice: HeadChoice, candidates: list[dict]) -> None:
        if self.directory is None:
            return
        from tlearn.files import write_atomically

        data = {"choice": {"C": choice.C, "class_weight": choice.class_weight, "metric": choice.metric,
                           "score": choice.score, "accuracy": choice.accuracy,
                           "balanced_accuracy": choice.balanced_accuracy, "log_loss": choice.log_loss,
                           "search": choice.search, "seconds": choice.seconds, "candidate": choice.candidate},
                "candidates": candidates, "oof_logits": np.round(choice.oof_logits, 5).tolist()}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            payload = json.dumps(data)
            write_atomically(self.directory / f"{key}.json", lambda tmp: Path(tmp).write_text(payload))
        except (OSError, OutputError):  # derived data: a refusing disk costs the next re-train seconds, no more
            pass
