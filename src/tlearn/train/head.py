"""Stage 1 of every recipe: a softmax-regression head on frozen, cached features.

Features are L2-normalised (the Classifier does the same in front of its head), then an L2-regularised
multinomial logistic regression is fitted for each strength on a path from strong to weak regularisation, each
fit warm-started from the previous one; the strength is chosen on the validation split.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import track
from torch import nn
from torch.nn import functional as F

# Inverse regularisation strengths tried, strongest first (C as in scikit-learn: penalty ||W||^2 / (2 C n)).
DEFAULT_C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


@dataclass
class HeadFit:
    head: nn.Linear  # acts on L2-normalised features
    C: float  # chosen inverse regularisation strength
    search: list[dict]  # val accuracy and log-loss of each C tried


def normalise_features(features: torch.Tensor) -> torch.Tensor:
    """The feature normalisation every head sees, in training and in prediction."""
    return F.normalize(features.float(), dim=-1)


def fit_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, n_classes: int,
             c_grid: tuple[float, ...] = DEFAULT_C_GRID, class_weight: np.ndarray | None = None,
             progress: bool = False) -> HeadFit:
    """Fit the head for each C in `c_grid` and keep the best on val (accuracy, then log-loss)."""
    xt, xv = normalise_features(torch.from_numpy(x_train)), normalise_features(torch.from_numpy(x_val))
    yt, yv = torch.from_numpy(y_train).long(), torch.from_numpy(y_val).long()
    weight = torch.as_tensor(class_weight, dtype=torch.float32) if class_weight is not None else None
    head = nn.Linear(xt.shape[1], n_classes)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    best, best_score, search = None, None, []
    for C in track(sorted(c_grid), description="fitting head", disable=not progress):
        _minimise(head, xt, yt, C, weight)
        with torch.no_grad():
            logits = head(xv)
        acc = float((logits.argmax(1) == yv).float().mean())
        loss = float(F.cross_entropy(logits, yv))
        search.append({"C": C, "val_accuracy": acc, "val_log_loss": loss})
        if best_score is None or (acc, -loss) > best_score:
            best, best_score = _copy(head), (acc, -loss)
    return HeadFit(best, _chosen_c(search, best_score), search)


def balanced_class_weight(y: np.ndarray, n_classes: int) -> np.ndarray:
    """n / (k * count) per class, as scikit-learn's class_weight='balanced'; all ones when balanced."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)


def _minimise(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, C: float, weight: torch.Tensor | None) -> None:
    optimiser = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=300, history_size=20, tolerance_grad=1e-6,
                                  tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = F.cross_entropy(head(x), y, weight=weight) + head.weight.pow(2).sum() / (2 * C * len(x))
        loss.backward()
        return loss

    optimiser.step(closure)


def _copy(head: nn.Linear) -> nn.Linear:
    clone = nn.Linear(head.in_features, head.out_features)
    clone.load_state_dict(head.state_dict())
    return clone


def _chosen_c(search: list[dict], score: tuple[float, float]) -> float:
    return next(s["C"] for s in search if (s["val_accuracy"], -s["val_log_loss"]) == score)
