"""The report's figures as PNG files, drawn by matplotlib's Agg canvas (no display, no pyplot).

`tlearn train` writes them on every run, so each figure is laid out once (`tight_layout`) and drawn once (`savefig`)
on a Figure with its own canvas: pyplot and its global figure manager are not needed. bench/report_speed.py times it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110
ANNOTATED_CLASSES = 25  # up to this many classes every confusion-matrix cell has its value written on it
# Above this many classes a figure of every class would be unreadable and huge (0.45 inch per class: 1,000 classes
# took gigabytes): the figures show the classes that matter most instead, and say so in their titles.
MAX_SHOWN_CLASSES = 50


def _subplots(width: float, height: float, **grid):
    # drawn at the DPI it is saved at, so the layout and the PNG share one renderer and its text-size cache
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(**grid)


def laid_out(fig: Figure) -> Figure:
    """`fig` laid out once (tight_layout), with no layout engine left to lay it out again when it is drawn."""
    fig.tight_layout()
    # tight_layout leaves a placeholder layout engine behind, for which savefig would lay out (draw) the whole
    # figure a second time before drawing it; the layout is done, so no engine at all
    fig.set_layout_engine(None)
    return fig


def _save(fig: Figure, path: Path, lay_out: bool = True) -> Path:
    if lay_out:
        laid_out(fig)
    fig.savefig(path, pil_kwargs={"compress_level": 1})  # zlib's fastest: a third less time, ~15% larger PNGs
    return path


def training_curves(history: list[dict], path: Path) -> Path:
    """Loss (train, val) and val accuracy per epoch, from the bundle's "history"."""
    return _save(training_curves_figure(history), path)


def training_curves_figure(history: list[dict]) -> Figure:
    """The figure of `training_curves` (a notebook shows it inline)."""
    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = _subplots(9, 3.4, ncols=2)
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        values = [row.get(key) for row in history]
        if any(v is not None for v in values):
            loss_ax.plot(epochs, [np.nan if v is None else v for v in values], marker="o", ms=3, label=label)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [row.get("val_accuracy", np.nan) for row in history], marker="o", ms=3, color="C2")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="val accuracy")
    return fig


def confusion_matrix_figure(matrix: list[list[int]], classes: list[str], normalised: bool = False,
                            title: str = "confusion matrix") -> Figure:
    """One confusion matrix heat map (counts, or each true-class row divided by its total), laid out: for a
    notebook. The report's two PNGs come from `confusion_matrices`."""
    figure = _ConfusionFigure(matrix, classes)
    figure.show(normalised, title)
    return laid_out(figure.fig)


def confusion_matrices(matrix: list[list[int]], classes: list[str], counts_path: Path,
                       normalised_path: Path) -> tuple[Path, Path]:
    """Confusion matrix heat maps: counts, and each true-class row divided by its total.

    The two differ only in their numbers and title, so one figure is built and laid out once and saved twice."""
    figure = _ConfusionFigure(matrix, classes)
    for normalised, path in ((False, counts_path), (True, normalised_path)):
        figure.show(normalised)
        _save(figure.fig, path, lay_out=path == counts_path)
    return counts_path, normalised_path


class _ConfusionFigure:
    """The axes of a confusion matrix (the most confused classes when there are many), drawn once; `show` puts
    the counts or the row-normalised values in them."""

    def __init__(self, matrix: list[list[int]], classes: list[str]):
        counts = np.asarray(matrix, dtype=float)
        normalised = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        shown = most_confused(counts, MAX_SHOWN_CLASSES)
        self.of_all = f" of the {len(shown)} most confused of {len(classes)} classes" if len(shown) < len(classes) \
            else ""
        self.counts, self.normalised = counts[np.ix_(shown, shown)], normalised[np.ix_(shown, shown)]
        classes = [classes[i] for i in shown]
        size = max(4.0, 0.45 * len(classes) + 2)
        annotated = len(classes) <= ANNOTATED_CLASSES
        self.fig, self.ax = _subplots(size if annotated else size + 1, size)
        self.image = self.ax.imshow(self.counts, cmap="Blues")
        if not annotated:  # with every value written in its cell, a colour scale would say nothing more
            self.fig.colorbar(self.image, ax=self.ax, fraction=0.046)
        self.ax.set_xticks(range(len(classes)), _labels(classes), rotation=60, ha="right", fontsize=8)
        self.ax.set_yticks(range(len(classes)), _labels(classes), fontsize=8)
        self.ax.set(xlabel="predicted", ylabel="true")
        self.cells = [(i, j) for (i, j), value in np.ndenumerate(self.counts) if value and annotated]
        self.texts = [self.ax.text(j, i, "", ha="center", va="center", fontsize=7) for i, j in self.cells]

    def show(self, normalised: bool, title: str = "confusion matrix") -> None:
        values, vmax = (self.normalised, 1.0) if normalised else (self.counts, self.counts.max())
        self.image.set_data(values)
        self.image.set_clim(0, vmax)
        self.ax.set_title(title + (" (row-normalised)" if normalised else "") + self.of_all)
        for text, (i, j) in zip(self.texts, self.cells):
            text.set_text(f"{values[i, j]:.2f}".lstrip("0") if normalised else f"{int(values[i, j])}")
            text.set_color("white" if values[i, j] > values.max() / 2 else "black")


def most_confused(counts: np.ndarray, limit: int) -> list[int]:
    """Every class when there are at most `limit`, else the `limit` classes with the most mistakes (as true or as
    predicted class), in their original order."""
    if len(counts) <= limit:
        return list(range(len(counts)))
    off = counts - np.diag(np.diag(counts))
    mistakes = off.sum(axis=0) + off.sum(axis=1)
    return sorted(np.argsort(-mistakes, kind="stable")[:limit].tolist())


def per_class_bars(per_class: dict[str, dict], path: Path) -> Path:
    """Precision, recall and F1 of every class side by side (past MAX_SHOWN_CLASSES: the classes with the lowest
    F1)."""
    names = list(per_class)
    title = "per-class precision / recall / F1"
    if len(names) > MAX_SHOWN_CLASSES:
        worst = sorted(names, key=lambda n: per_class[n]["f1"])[:MAX_SHOWN_CLASSES]
        title = f"{title}: the {MAX_SHOWN_CLASSES} lowest F1 of {len(names)}"
        names = [n for n in names if n in set(worst)]
    x = np.arange(len(names))
    fig, ax = _subplots(max(6.0, 0.5 * len(names) + 2), 3.6)
    for k, metric in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (k - 1) * 0.27, [per_class[n][metric] for n in names], width=0.27, label=metric)
    ax.set_xticks(x, _labels(names), rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center",
                  fontsize=8)
    ax.set(ylim=(0, 1.05), title=title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def reliability(before: list[dict], after: list[dict], ece_before: float, ece_after: float, path: Path,
                split: str) -> Path:
    """Accuracy against confidence per bin, before and after temperature scaling; the diagonal is perfect."""
    fig, axes = _subplots(8, 3.8, ncols=2, sharey=True)
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
    fig, ax = _subplots(6, 3.6)
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


def _labels(names: list[str]) -> list[str]:
    """Class names as matplotlib draws them: control characters and bytes that are not UTF-8 escaped (the font
    renderer refuses surrogates), '$' kept literal (not the start of mathtext)."""
    from tlearn.outputs import plain_text

    return [plain_text(name).replace("$", r"\$") for name in names]
