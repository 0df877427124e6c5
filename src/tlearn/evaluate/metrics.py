"""Classification metrics with the same keys everywhere (metrics.json, `evaluate`, reports)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import bootstrap
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


BOOTSTRAP_RESAMPLES = 2000


@dataclass
class ScoredSplit:
    """Per-image results of one split: files, true labels and the model's uncalibrated logits."""

    name: str
    paths: list[Path]
    labels: np.ndarray  # (n,) int
    logits: np.ndarray  # (n, n_classes) float

    def proba(self, temperature: float = 1.0) -> np.ndarray:
        z = self.logits / temperature
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], seed: int = 0) -> dict:
    """accuracy, mean_class_accuracy, balanced_accuracy, macro_f1, n, per_class, confusion_matrix and ci95
    (seeded bootstrap 95% intervals of accuracy and mean_class_accuracy)."""
    labels = list(range(len(classes)))
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return {"n": 0, "accuracy": None, "mean_class_accuracy": None, "balanced_accuracy": None,
                "macro_f1": None, "per_class": {}, "confusion_matrix": [], "classes": classes, "ci95": {}}
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    present = support > 0
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()),
        # recall per class is the accuracy on that class; averaged over the classes that occur
        "mean_class_accuracy": float(recall[present].mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=[i for i in labels if present[i]], average="macro",
                                   zero_division=0)),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classes": classes,
        "ci95": bootstrap_intervals(y_true, y_pred, len(classes), seed),
    }


def bootstrap_intervals(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, seed: int = 0,
                        resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Percentile bootstrap 95% intervals (images resampled with replacement) of accuracy and mean class accuracy."""
    correct = (np.asarray(y_true) == np.asarray(y_pred)).astype(float)

    def mean_class_accuracy(hit: np.ndarray, label: np.ndarray, axis: int = -1) -> np.ndarray:
        # per resample (leading axes): accuracy of each class present in it, averaged over those classes
        lead = hit.shape[:-1]
        hit, label = hit.reshape(-1, hit.shape[-1]), label.reshape(-1, label.shape[-1]).astype(np.int64)
        slots = (np.arange(len(hit))[:, None] * n_classes + label).ravel()
        size = len(hit) * n_classes
        hits = np.bincount(slots, weights=hit.ravel(), minlength=size).reshape(-1, n_classes)
        totals = np.bincount(slots, minlength=size).reshape(-1, n_classes)
        present = totals > 0
        per_class = np.divide(hits, totals, out=np.zeros_like(hits), where=present)
        return (per_class.sum(axis=1) / present.sum(axis=1)).reshape(lead)

    intervals = {}
    for name, data, statistic, paired in (("accuracy", (correct,), np.mean, False),
                                          ("mean_class_accuracy", (correct, np.asarray(y_true)),
                                           mean_class_accuracy, True)):
        if len(correct) < 2:
            continue
        result = bootstrap(data, statistic, paired=paired, vectorized=True, n_resamples=resamples,
                           confidence_level=0.95, method="percentile", rng=np.random.default_rng(seed),
                           batch=200)
        intervals[name] = [float(result.confidence_interval.low), float(result.confidence_interval.high)]
    return intervals
