"""Which views of each image the head learns from and predicts on: the image alone, or with its mirror.

    off    rows of the image's features; predicts on them (one forward pass per image)
    train  rows of the image's and of its mirror's features (twice the rows); predicts on the image's (one pass)
    tta    rows of the image's features; predicts on the mean of the image's and its mirror's (two passes)
    both   both rows; predicts on the mean (two passes)

`auto` scores a head for each by cross-validation on train (tlearn.train.choices: out-of-fold log loss, then
accuracy; the cheaper one on a tie), so the reported val is untouched by the choice. numpy and scipy only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from tlearn.train.choices import Candidate, ChoiceStore, Folds, HeadChoice, choose_kept


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
    split: str = ""  # the folds the choice was scored on, in words ("" when asked for by name)
    images: int = 0
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # recipe -> out-of-fold log loss, accuracy
    seconds: float = 0.0  # spent choosing

    @property
    def recipe(self) -> ViewRecipe:
        return RECIPES[self.chosen]

    def to_dict(self) -> dict:
        return {**asdict(self), "tta": self.recipe.tta, "train_mirror": self.recipe.train_mirror,
                "forwards_per_image": 2 if self.recipe.tta else 1}


def choose_views(asked: str, image: np.ndarray, mirrored: np.ndarray | None, y: np.ndarray, folds: Folds,
                 n_classes: int, store: ChoiceStore | None = None) -> tuple[ViewChoice, HeadChoice, Candidate]:
    """The recipe asked for, or with "auto" the best by cross-validation on train (train's image and mirror
    features `image`, `mirrored`, labels `y`), with the head choice made for it on the same folds and the candidate
    the head is refitted on. `store` keeps the choice per content: a re-train on the same features reads it."""
    names = list(RECIPES) if asked == "auto" else [asked]
    candidates = [Candidate(n, image, mirrored, RECIPES[n].train_mirror, RECIPES[n].tta) for n in names]
    choice, scores = choose_kept(candidates, y, folds, n_classes, store)
    auto = len(names) > 1
    views = ViewChoice(choice.candidate, asked, folds.describe() if auto else "", len(y) if auto else 0,
                       scores if auto else {}, choice.seconds)
    return views, choice, next(c for c in candidates if c.name == choice.candidate)
