"""What to label next: unlabelled images ordered by how much labelling them should help (numpy only).

Uncertainty is the margin between the two likeliest classes (small: the model hesitates) or the entropy of the
calibrated probabilities. Diversity keeps the first picks from being near-copies of each other: ranked batch-mode
sampling (Cardoso, Fonseca-Ferraz et al., "Ranked batch-mode active learning", Information Sciences 2017), where
each next pick maximises

    alpha * (1 - max cosine similarity to what is labelled or already picked) + (1 - alpha) * uncertainty,
    alpha = unpicked / (unpicked + labelled and picked)

on the model's own pooled features. Past the first `diverse` picks the rest follow by uncertainty alone (the
greedy step costs one pass over the pool per pick).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MEASURES = ("margin", "entropy")


@dataclass(frozen=True)
class Ranked:
    order: np.ndarray  # indices into the pool, first = label it first
    uncertainty: np.ndarray  # per pool image, in [0, 1] (1: the model cannot tell)
    novelty: np.ndarray  # per pool image: 1 - its max cosine similarity to what was labelled or picked before it


def uncertainty(proba: np.ndarray, measure: str = "margin") -> np.ndarray:
    """Per row of calibrated probabilities, in [0, 1]: 1 - (p1 - p2), or the entropy over log(classes)."""
    proba = np.asarray(proba, np.float64)
    if measure == "margin":
        top2 = np.sort(proba, axis=1)[:, -2:]
        return 1.0 - (top2[:, 1] - top2[:, 0])
    if measure == "entropy":
        p = np.clip(proba, 1e-12, 1.0)
        return -(p * np.log(p)).sum(1) / np.log(proba.shape[1])
    raise ValueError(f"measure must be one of {', '.join(MEASURES)}, not {measure!r}")


def rank_for_labelling(features: np.ndarray, proba: np.ndarray, labelled: np.ndarray | None = None, *,
                       measure: str = "margin", diverse: int | None = 1000) -> Ranked:
    """The pool (`features`, `proba` per image) in the order to label it; `labelled`: features already labelled.
    `diverse`: how many first picks weigh diversity (None: all; 0: uncertainty alone)."""
    unsure = uncertainty(proba, measure)
    n = len(unsure)
    x = _unit(features)
    closest = np.zeros(n)  # max cosine similarity to the labelled and picked so far (0: nothing yet)
    if labelled is not None and len(labelled):
        ref = _unit(labelled)
        for start in range(0, len(ref), 1024):
            closest = np.maximum(closest, (x @ ref[start:start + 1024].T).max(1))
    known = 0 if labelled is None else len(labelled)
    steps = n if diverse is None else min(n, diverse)
    picked = np.zeros(n, bool)
    order, novelty = [], np.zeros(n)
    for step in range(steps):
        alpha = (n - step) / (n - step + known + step)
        score = alpha * (1.0 - np.clip(closest, 0.0, 1.0)) + (1.0 - alpha) * unsure
        score[picked] = -np.inf
        best = int(np.argmax(score))
        order.append(best)
        novelty[best] = 1.0 - max(0.0, closest[best])
        picked[best] = True
        closest = np.maximum(closest, x @ x[best])
    rest = np.flatnonzero(~picked)
    rest = rest[np.argsort(-unsure[rest], kind="stable")]
    novelty[rest] = 1.0 - np.clip(closest[rest], 0.0, 1.0)
    return Ranked(np.concatenate([np.array(order, np.int64), rest]).astype(np.int64), unsure, novelty)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
