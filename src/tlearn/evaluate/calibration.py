"""Probabilities that mean what they say: temperature scaling, expected calibration error, abstention curves.

The temperature is fitted on images no reported split holds (out-of-fold train); val and test are only
measured.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # metrics imports scikit-learn and scipy.stats; the report uses this module without them
    from tlearn.evaluate.metrics import ScoredSplit

ECE_BINS = 15
# the temperatures fit_temperature may choose, searched on log T so that they are symmetric around "no change";
# a model folder whose temperature lies outside them was edited (tlearn.bundle refuses it)
TEMPERATURE_BOUNDS = (1 / 20, 20.0)
COVERAGE_THRESHOLDS = tuple(np.round(np.linspace(0.0, 0.95, 20), 2))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the negative log-likelihood of softmax(logits / T) (Guo et al., 2017): a golden-section
    search on log T (the likelihood is unimodal in T), in numpy: a cached re-train need not import scipy for it."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        return float((np.log(np.exp(z).sum(axis=1)) - z[rows, labels]).mean())

    low, high = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    ratio = (np.sqrt(5.0) - 1) / 2
    a, b = low + (1 - ratio) * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    while high - low > 1e-6:
        if fa <= fb:
            high, b, fb = b, a, fa
            a = low + (1 - ratio) * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return float(np.exp((low + high) / 2))


def reliability_bins(proba: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per confidence bin (equal width on [0, 1]): its range, images, mean confidence and accuracy."""
    confidence, hit = proba.max(axis=1), proba.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(inside.sum()),
                     "confidence": float(confidence[inside].mean()) if inside.any() else None,
                     "accuracy": float(hit[inside].mean()) if inside.any() else None})
    return rows


def expected_calibration_error(proba: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Image-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    rows = reliability_bins(proba, labels, bins)
    total = sum(r["n"] for r in rows)
    return float(sum(r["n"] * abs(r["accuracy"] - r["confidence"]) for r in rows if r["n"]) / max(1, total))


def accuracy_coverage(proba: np.ndarray, labels: np.ndarray,
                      thresholds: tuple[float, ...] = COVERAGE_THRESHOLDS) -> list[dict]:
    """For each threshold: share of images answered (confidence >= threshold) and accuracy on those."""
    confidence, hit = proba.max(axis=1), proba.argmax(axis=1) == labels
    rows = []
    for t in thresholds:
        answered = confidence >= t
        rows.append({"threshold": float(t), "coverage": float(answered.mean()),
                     "accuracy": float(hit[answered].mean()) if answered.any() else None})
    return rows


def calibrate(scored: dict[str, ScoredSplit], fitted: ScoredSplit) -> dict:
    """Fit the temperature on `fitted` (logits of images the model did not learn from and no reported split: the
    out-of-fold train images, or the fine-tune's inner split) and measure ECE before/after on it and on every split
    of `scored` (which are only measured).

    The result is the bundle's "calibration" config section.
    """
    # With no mistake to learn from, the likelihood only grows as T -> 0: the data cannot say how sure to be, so
    # the model is left as it is rather than made (near) certain of everything.
    errors = int((fitted.logits.argmax(1) != fitted.labels).sum())
    temperature = fit_temperature(fitted.logits, fitted.labels) if errors else 1.0
    scored = {fitted.name: fitted, **scored}
    return {"method": "temperature" if errors else f"none (no mistakes on {fitted.name} to learn from)",
            "fitted_on": fitted.name,
            "temperature": temperature, "bins": ECE_BINS,
            "ece_before": {name: expected_calibration_error(s.proba(), s.labels) for name, s in scored.items()},
            "ece_after": {name: expected_calibration_error(s.proba(temperature), s.labels)
                          for name, s in scored.items()}}
