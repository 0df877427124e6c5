"""Which views of each image the head learns from and predicts on: the image alone, or with its mirror.

    off    rows of the image's features; predicts on them (one forward pass per image)
    train  rows of the image's and of its mirror's features (twice the rows); predicts on the image's (one pass)
    tta    rows of the image's features; predicts on the mean of the image's and its mirror's (two passes)
    both   both rows; predicts on the mean (two passes)

`auto` fits a head for each on train without an inner split and keeps the best on that inner split (accuracy, then
log loss; the cheaper one on a tie), so the reported val is untouched by the choice. numpy and scipy only.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from tlearn.train.inner import describe_inner_split, inner_head_score, inner_split


@dataclass(frozen=True)
class ViewRecipe:
    name: str
    train_mirror: bool  # the mirror's features are extra training rows
    tta: bool  # predictions use the mean of the image's and its mirror's features (two forward passes)

    def train_rows(self, image: np.ndarray, mirrored: np.ndarray | None, y: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        """The head's training rows and their labels."""
        if not self.train_mirror:
            return image, y
        return np.concatenate([image, mirrored]), np.concatenate([y, y])

    def eval_rows(self, image: np.ndarray, mirrored: np.ndarray | None) -> np.ndarray:
        """The features the head is scored on, as prediction will compute them."""
        return (image + mirrored) / 2 if self.tta else image


RECIPES = {r.name: r for r in (ViewRecipe("off", False, False), ViewRecipe("train", True, False),
                               ViewRecipe("tta", False, True), ViewRecipe("both", True, True))}  # cheapest first


def needs_mirror(asked: str) -> bool:
    """Whether the setting `asked` (a recipe's name or "auto") needs the mirrors' features extracted."""
    return asked == "auto" or RECIPES[asked].train_mirror or RECIPES[asked].tta


@dataclass
class ViewChoice:
    """The views a head uses, and how they were chosen (recorded in the model's config)."""

    chosen: str  # a key of RECIPES
    asked: str  # a key of RECIPES, or "auto"
    split: str = ""  # the inner split the choice was scored on, in words ("" when asked for by name)
    images: int = 0
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # recipe -> inner accuracy and log loss
    seconds: float = 0.0  # spent choosing

    @property
    def recipe(self) -> ViewRecipe:
        return RECIPES[self.chosen]

    def to_dict(self) -> dict:
        return {**asdict(self), "tta": self.recipe.tta, "train_mirror": self.recipe.train_mirror,
                "forwards_per_image": 2 if self.recipe.tta else 1}


def choose_views(asked: str, image: np.ndarray, mirrored: np.ndarray | None, y: np.ndarray, n_classes: int,
                 fraction: float, seed: int) -> ViewChoice:
    """The recipe asked for, or with "auto" the best on an inner split of train (train's image and mirror features
    `image`, `mirrored`, labels `y`)."""
    if asked != "auto":
        return ViewChoice(asked, asked)
    start = time.perf_counter()
    inner = inner_split(y, fraction, seed)
    scores = {}
    for name, recipe in RECIPES.items():
        x, labels = recipe.train_rows(image[~inner], mirrored[~inner], y[~inner])
        scores[name] = inner_head_score(x, labels, recipe.eval_rows(image[inner], mirrored[inner]), y[inner],
                                        n_classes)
    chosen = max(RECIPES, key=lambda name: scores[name])  # the first (cheapest) of equals
    return ViewChoice(chosen, asked, describe_inner_split(fraction, seed), int(inner.sum()),
                      {n: {"accuracy": a, "log_loss": -nl} for n, (a, nl) in scores.items()},
                      time.perf_counter() - start)
