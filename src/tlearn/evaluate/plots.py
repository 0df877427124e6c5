"""The report's figures as PNG files (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

DPI = 110


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def training_curves(history: list[dict], path: Path) -> Path:
    """Loss (train, val) and val accuracy per epoch, from the bundle's "history"."""
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        values = [row.get(key) for row in history]
        if any(v is not None for v in values):
            loss_ax.plot(epochs, [np.nan if v is None else v for v in values], marker="o", ms=3, label=label)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [row.get("val_accuracy", np.nan) for row in history], marker="o", ms=3, color="C2")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="val accuracy")
    return _save(fig, path)


def confusion(matrix: list[list[int]], classes: list[str], path: Path, normalised: bool) -> Path:
    """Confusion matrix heat map: counts, or each true-class row divided by its total."""
    cm = np.asarray(matrix, dtype=float)
    if normalised:
        cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalised else None)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix" + (" (row-normalised)" if normalised else ""))
    if len(classes) <= 25:
        for (i, j), value in np.ndenumerate(cm):
            if value:
                text = f"{value:.2f}".lstrip("0") if normalised else f"{int(value)}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if value > cm.max() / 2 else "black")
    return _save(fig, path)


def per_class_bars(per_class: dict[str, dict], path: Path) -> Path:
    """Precision, recall and F1 of every class side by side."""
    names = list(per_class)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(names) + 2), 3.6))
    for k, metric in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (k - 1) * 0.27, [per_class[n][metric] for n in names], width=0.27, label=metric)
    ax.set_xticks(x, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center",
                  fontsize=8)
    ax.set(ylim=(0, 1.05), title="per-class precision / recall / F1")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def reliability(before: list[dict], after: list[dict], ece_before: float, ece_after: float, path: Path,
                split: str) -> Path:
    """Accuracy against confidence per bin, before and after temperature scaling; the diagonal is perfect."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8), sharey=True)
    for ax, rows, title in ((axes[0], before, f"before (ECE {ece_before:.3f})"),
                            (axes[1], after, f"after temperature (ECE {ece_after:.3f})")):
        filled = [r for r in rows if r["n"]]
        centres = [(r["low"] + r["high"]) / 2 for r in filled]
        width = rows[0]["high"] - rows[0]["low"]
        ax.bar(centres, [r["accuracy"] for r in filled], width=width * 0.95, color="C0", alpha=0.8,
               label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
        ax.plot([r["confidence"] for r in filled], [r["accuracy"] for r in filled], "o", color="C3", ms=3,
                label="mean confidence")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=f"{split}: {title}")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def coverage(rows: list[dict], path: Path, split: str) -> Path:
    """Accuracy on the images answered and share answered, as the confidence threshold rises."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    thresholds = [r["threshold"] for r in rows]
    ax.plot(thresholds, [np.nan if r["accuracy"] is None else r["accuracy"] for r in rows], marker="o", ms=3,
            label="accuracy on answered")
    ax.plot(thresholds, [r["coverage"] for r in rows], marker="s", ms=3, label="coverage (share answered)")
    lowest = min([r["coverage"] for r in rows] + [r["accuracy"] for r in rows if r["accuracy"] is not None])
    ax.set(xlabel="--min-confidence threshold (calibrated)", ylim=(max(0.0, lowest - 0.05), 1.01),
           title=f"{split}: accuracy vs coverage")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)
