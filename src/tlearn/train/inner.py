"""The inner split: a seeded, stratified part of train held out for choices that must not look at val.

Every choice a train makes beyond the head's strength (the stage a fine-tune keeps, the views the head uses, the
backbone `--backbone auto` keeps) is scored here, so the val figures a model reports are untouched by it.
numpy and scipy only: the choices made on cached features never import torch.
"""
from __future__ import annotations

import numpy as np


def inner_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over train: a seeded, stratified `fraction` of each class (one image at least, when the class
    has two or more), for choices that must not look at val."""
    labels = np.asarray(labels)
    mask = np.zeros(len(labels), bool)
    rng = np.random.default_rng(seed + 1)  # not the generator that carved val and test from the data
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) >= 2:
            take = min(len(members) - 1, max(1, round(fraction * len(members))))
            mask[rng.choice(members, take, replace=False)] = True
    return mask


def describe_inner_split(fraction: float, seed: int) -> str:
    """`inner_split` in words, for the record of a choice made on it."""
    return f"{fraction:g} of train, stratified, seed {seed}"


def val_score(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, -log loss): the candidate with the larger score is kept (accuracy first, log loss breaks ties)."""
    from scipy.special import log_softmax

    log_proba = log_softmax(np.asarray(logits, np.float64), axis=1)
    y = np.asarray(y, np.int64)
    return float((log_proba.argmax(1) == y).mean()), float(log_proba[np.arange(len(y)), y].mean())


def inner_head_score(x_train: np.ndarray, y_train: np.ndarray, x_inner: np.ndarray, y_inner: np.ndarray,
                     n_classes: int) -> tuple[float, float]:
    """val_score on the inner split of a head fitted on the rest of train (its strength chosen on the inner split,
    as for every candidate compared this way)."""
    from tlearn.train.head import balanced_class_weight, fit_head

    fit = fit_head(x_train, y_train, x_inner, y_inner, n_classes,
                   class_weight=balanced_class_weight(np.asarray(y_train), n_classes))
    return val_score(fit.head.logits(x_inner), y_inner)
