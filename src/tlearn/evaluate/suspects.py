"""Training images whose given label the model doubts, from out-of-fold probabilities (confident learning).

Confident learning (Northcutt, Jiang and Chuang, JAIR 2021), counted here in a few lines of numpy rather than
through cleanlab (AGPL-3, which a permissively licensed tool cannot depend on):

1. Each class j gets a threshold t_j: the mean out-of-fold probability of class j over the images labelled j
   (how sure the model is, on average, of that class when it is right to be).
2. An image is counted as confidently in class j* when its probability of j* reaches t_j* (the most probable of
   the classes whose threshold it reaches): the confident joint counts given label x j*, scaled to each class's
   size, estimate how many images labelled i are really j.
3. Suspect: for each such pair, that many images labelled i with the largest p(j) - p(i) (cleanlab's "prune by
   noise rate"), and every image whose likeliest class is not its given label (its "predicted != given"); the
   union, because on oxford17flowers with 5% seeded flips the pruning alone missed 11 of the 54 flipped files
   (all 54 were predicted as another class). The suggested label is the likeliest class other than the given.
4. Suspects are ranked by self-confidence (the out-of-fold probability of the given label, lowest first) or by
   the normalised margin (given label's probability minus the best other class's, lowest first).

Every probability comes from a head that never saw the image (tlearn.train.choices), so an image cannot vouch for
its own label. numpy only: the base install ranks a model folder's out_of_fold.csv without torch.
"""
from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field

import numpy as np

RANKINGS = ("self_confidence", "margin")


@dataclass(frozen=True)
class Suspect:
    rank: int
    path: str  # relative to the dataset root
    given: str
    suggested: str
    self_confidence: float  # out-of-fold probability of the given label
    suggested_probability: float
    margin: float  # given label's probability minus the best other class's (negative: another class is likelier)


@dataclass
class SuspectReport:
    suspects: list[Suspect]
    images: int  # training images looked at
    thresholds: dict[str, float]  # per class: the confident-learning threshold
    ranked_by: str
    source: str  # where the out-of-fold probabilities came from, in words
    classes: list[str] = field(default_factory=list)
    estimated_errors: int = 0  # label errors the calibrated confident joint estimates in all (off its diagonal)

    @property
    def share(self) -> float:
        return len(self.suspects) / max(1, self.images)

    def to_dict(self) -> dict:
        return {"method": "confident learning on out-of-fold probabilities", "ranked_by": self.ranked_by,
                "source": self.source, "images": self.images, "suspects": len(self.suspects),
                "estimated_errors": self.estimated_errors,
                "thresholds": self.thresholds, "rows": [asdict(s) for s in self.suspects]}

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        names = [f for f in Suspect.__dataclass_fields__]
        writer.writerow(names)
        for s in self.suspects:
            writer.writerow([getattr(s, n) if not isinstance(getattr(s, n), float) else f"{getattr(s, n):.6g}"
                             for n in names])
        return buffer.getvalue()


def find_suspects(classes: list[str], paths: list[str], labels: np.ndarray, proba: np.ndarray,
                  ranked_by: str = "self_confidence", source: str = "") -> SuspectReport:
    """The training images whose given `labels` the out-of-fold `proba` (n x classes) contradicts, ranked."""
    if ranked_by not in RANKINGS:
        raise ValueError(f"ranked_by must be one of {', '.join(RANKINGS)}, not {ranked_by!r}")
    labels, proba = np.asarray(labels, np.int64), np.asarray(proba, np.float64)
    n, k = proba.shape
    thresholds = np.array([proba[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(k)])
    reaches = proba >= thresholds[None, :] - 1e-12
    rows = np.arange(n)
    given = proba[rows, labels]
    others = proba.copy()
    others[rows, labels] = -1.0
    margin = given - others.max(1)
    # the confident joint: given label x the likeliest class whose threshold the image reaches
    confident = np.where(reaches, proba, -1.0).argmax(1)
    counted = reaches.any(1)
    joint = np.zeros((k, k))
    np.add.at(joint, (labels[counted], confident[counted]), 1.0)
    flagged = proba.argmax(1) != labels  # the head that never saw it answers another class
    estimated_errors = 0.0
    for i in range(k):
        members = np.flatnonzero(labels == i)
        if not len(members) or not joint[i].sum():
            continue
        estimated = joint[i] * len(members) / joint[i].sum()  # calibrated to the class's size
        estimated_errors += estimated.sum() - estimated[i]
        for j in (j for j in range(k) if j != i and round(estimated[j]) > 0):
            # prune by noise rate: the images labelled i most likely to be j, as many as the joint estimates
            take = min(round(estimated[j]), len(members) - 1)
            flagged[members[np.argsort(proba[members, i] - proba[members, j], kind="stable")[:take]]] = True
    suggested = others.argmax(1)
    order = [i for i in np.argsort(given if ranked_by == "self_confidence" else margin, kind="stable") if flagged[i]]
    suspects = [Suspect(r + 1, paths[i], classes[labels[i]], classes[suggested[i]], float(given[i]),
                        float(proba[i, suggested[i]]), float(margin[i])) for r, i in enumerate(order)]
    return SuspectReport(suspects, n, {c: float(t) for c, t in zip(classes, thresholds)}, ranked_by, source,
                         list(classes), round(estimated_errors))
