"""Stage 1 of every recipe: a softmax-regression head on frozen, cached features.

The L2 strength is chosen on the validation split; the features' standardisation is folded into the final
linear layer, so the head is one `nn.Linear` that runs on raw backbone features.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler
from torch import nn

DEFAULT_C_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


@dataclass
class HeadFit:
    head: nn.Linear
    C: float  # chosen inverse regularisation strength
    search: list[dict]  # val accuracy and log-loss of each C tried


def fit_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, n_classes: int,
             c_grid: tuple[float, ...] = DEFAULT_C_GRID, seed: int = 0) -> HeadFit:
    """Fit a linear softmax head for each C in `c_grid`; keep the best on val (accuracy, then log-loss)."""
    scaler = StandardScaler().fit(x_train)
    xt, xv = scaler.transform(x_train), scaler.transform(x_val)
    best, best_score, search = None, None, []
    for C in c_grid:
        clf = LogisticRegression(C=C, max_iter=3000, class_weight="balanced", random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(xt, y_train)
        proba = _full_proba(clf, xv, n_classes)
        acc = float((proba.argmax(1) == y_val).mean())
        loss = float(log_loss(y_val, proba, labels=list(range(n_classes))))
        search.append({"C": C, "val_accuracy": acc, "val_log_loss": loss})
        score = (acc, -loss)
        if best_score is None or score > best_score:
            best, best_score = clf, score
    return HeadFit(_fold(best, scaler, n_classes), float(best.C), search)


def _full_proba(clf: LogisticRegression, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all n_classes (a class absent from train gets a column of zeros)."""
    proba = np.zeros((len(x), n_classes))
    proba[:, clf.classes_] = clf.predict_proba(x)
    return proba / proba.sum(axis=1, keepdims=True)


def _fold(clf: LogisticRegression, scaler: StandardScaler, n_classes: int) -> nn.Linear:
    """One linear layer on raw features computing the logits of `clf` on standardised features."""
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary: sigmoid(z) == softmax([-z/2, z/2])
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = np.full((n_classes, coef.shape[1]), 0.0)
    bias = np.full(n_classes, -1e4)  # classes never seen in training are never predicted
    weight[clf.classes_], bias[clf.classes_] = coef, intercept
    scale = np.where(scaler.scale_ == 0, 1.0, scaler.scale_)
    folded_w = weight / scale
    folded_b = bias - folded_w @ scaler.mean_
    head = nn.Linear(weight.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(folded_w).float())
        head.bias.copy_(torch.from_numpy(folded_b).float())
    return head
