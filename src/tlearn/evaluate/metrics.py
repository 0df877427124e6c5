"""Classification metrics with the same keys everywhere (metrics.json, `evaluate`, reports).

All of them come from the confusion matrix and a seeded bootstrap, in numpy. scikit-learn's metrics and scipy's
bootstrap give the same numbers (tests/test_evaluate.py checks both) but importing them costs ~0.55 s, a quarter
of a re-train on cached features, which computes these on every run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import softmax

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_BATCH = 200  # resamples drawn at once: bounded memory on large splits


@dataclass
class ScoredSplit:
    """Per-image results of one split: files, true labels and the model's uncalibrated logits."""

    name: str
    paths: list[Path]
    labels: np.ndarray  # (n,) int
    logits: np.ndarray  # (n, n_classes) float

    def proba(self, temperature: float = 1.0) -> np.ndarray:
        return softmax(self.logits / temperature, axis=1)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], seed: int = 0) -> dict:
    """accuracy, mean_class_accuracy, balanced_accuracy, macro_f1, n, per_class, confusion_matrix and ci95
    (seeded bootstrap 95% intervals of accuracy and mean_class_accuracy), as scikit-learn defines them (with
    zero_division=0; averages over the classes that occur in y_true)."""
    k = len(classes)
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if len(y_true) == 0:
        return {"n": 0, "accuracy": None, "mean_class_accuracy": None, "balanced_accuracy": None,
                "macro_f1": None, "per_class": {}, "confusion_matrix": [], "classes": classes, "ci95": {}}
    cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)  # rows: true class, columns: predicted
    hits, support, predicted = np.diag(cm).astype(float), cm.sum(axis=1), cm.sum(axis=0)
    precision = np.divide(hits, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros(k), where=support > 0)
    f1_denominator = 2 * hits + (predicted - hits) + (support - hits)
    f1 = np.divide(2 * hits, f1_denominator, out=np.zeros(k), where=f1_denominator > 0)
    present = support > 0
    # recall per class is the accuracy on that class; averaged over the classes that occur
    mean_class_accuracy = float(recall[present].mean())
    return {
        "n": int(len(y_true)),
        "accuracy": float(hits.sum() / len(y_true)),
        "mean_class_accuracy": mean_class_accuracy,
        "balanced_accuracy": mean_class_accuracy,  # scikit-learn's balanced_accuracy_score: the same average
        "macro_f1": float(f1[present].mean()),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(classes)},
        "confusion_matrix": cm.tolist(),
        "classes": classes,
        "ci95": bootstrap_intervals(y_true, y_pred, k, seed),
    }


def bootstrap_intervals(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, seed: int = 0,
                        resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Percentile bootstrap 95% intervals (images resampled with replacement) of accuracy and mean class accuracy."""
    y_true = np.asarray(y_true, np.int64)
    correct = (y_true == np.asarray(y_pred, np.int64)).astype(float)
    n = len(correct)
    if n < 2:
        return {}
    rng = np.random.default_rng(seed)
    accuracy, mean_class = [], []
    for start in range(0, resamples, BOOTSTRAP_BATCH):
        rows = min(BOOTSTRAP_BATCH, resamples - start)
        pick = rng.integers(0, n, size=(rows, n))  # one resample of the images per row
        hit, label = correct[pick], y_true[pick]
        accuracy.append(hit.mean(axis=1))
        # per resample: accuracy of each class present in it, averaged over those classes
        slots = (np.arange(rows)[:, None] * n_classes + label).ravel()
        hits = np.bincount(slots, weights=hit.ravel(), minlength=rows * n_classes).reshape(rows, n_classes)
        totals = np.bincount(slots, minlength=rows * n_classes).reshape(rows, n_classes)
        per_class = np.divide(hits, totals, out=np.zeros_like(hits), where=totals > 0)
        mean_class.append(per_class.sum(axis=1) / (totals > 0).sum(axis=1))
    return {name: [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
            for name, values in (("accuracy", np.concatenate(accuracy)),
                                 ("mean_class_accuracy", np.concatenate(mean_class)))}
