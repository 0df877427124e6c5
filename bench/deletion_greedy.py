"""Issue 21, an experiment: does a greedy heat (explain, grey its hottest part, explain again) pass the deletion test?

    HF_HUB_OFFLINE=1 .venv/bin/python bench/deletion_greedy.py [--data ../shared/datasets/oxford17flowers]

The deletion test of bench/explain.py at the image's own size (grey 20% of the centre crop's pixels of the decoded
file, predict from the array, the mean drop of the top-1 class's calibrated probability over 50 seeded test images),
for heats that cost extra forward passes:
- cam: `Predictor.explain` as shipped (one pass);
- pixels-F: grey the hottest fraction F of the 20% by the CAM at the image's size, explain the greyed image again
  (one more pass, plus a decode-size greying and resize), and take the rest of the 20% by that second map;
- cells-K[xN]: the same on the CAM grid in the model's input: grey its K hottest cells (32 x 32 px each), explain
  again, N times (N more passes); the combined grid ranks the cells in the order they were greyed, then the rest by
  the last map, and is upsampled as the heat is.
Against a random scattered 20% of the crop (the bar: the heat's drop >= 2x). One JSON line.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from explain import arguments, cpu_name, trained_model  # bench/explain.py: the same options, model and images
from PIL import Image, ImageOps

from tlearn.explain import explain_pixels, upsample
from tlearn.predict import Predictor

GREY, FRACTION = 128, 0.2


def cells_grid(predictor: Predictor, pixels: np.ndarray, label: str, steps: list[int]) -> np.ndarray:
    grid = explain_pixels(predictor, pixels, label)[0]
    cell = predictor.input_size // grid.shape[0]
    order = np.zeros(grid.shape, np.float32)
    taken = np.zeros(grid.shape, bool)
    current, level = pixels.copy(), len(steps) + 1
    for k in steps:
        for flat in np.argsort(-np.where(taken, -np.inf, grid).ravel(), kind="stable")[:k]:
            y, x = np.unravel_index(flat, grid.shape)
            taken[y, x] = True
            order[y, x] = level + 0.5 * grid[y, x] / (np.abs(grid).max() + 1e-9)
            current[:, :, y * cell:(y + 1) * cell, x * cell:(x + 1) * cell] = GREY
        level -= 1
        grid = explain_pixels(predictor, current, label)[0]
    rest = grid[~taken]
    order[~taken] = 0.9 * (rest - rest.min()) / (rest.max() - rest.min() + 1e-9)
    return order


def run(predictor: Predictor, files: list[Path], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    drops: dict[str, list[float]] = {}
    for file in files:
        with Image.open(file) as opened:
            picture = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
        explanation = predictor.explain(picture)
        index = predictor.classes.index(explanation.label)

        def probability(array: np.ndarray) -> float:
            return float(predictor.probabilities(predictor.to_pixels(array)[None])[0, index])

        def grey(where: np.ndarray) -> np.ndarray:
            out = picture.copy().reshape(-1, 3)
            out[where] = GREY
            return out.reshape(picture.shape)

        def at_image(grid: np.ndarray) -> np.ndarray:
            heat = np.full(picture.shape[:2], -np.inf, np.float32)
            heat[top:bottom, left:right] = upsample(grid, (right - left, bottom - top))
            return heat.ravel()

        before = probability(picture)
        left, top, right, bottom = explanation.box
        crop = np.zeros(picture.shape[:2], bool)
        crop[top:bottom, left:right] = True
        inside = np.flatnonzero(crop.ravel())
        count = int(round(FRACTION * inside.size))
        cam = at_image(explanation.grid)[inside]
        chosen = {"cam": inside[np.argsort(-cam, kind="stable")[:count]],
                  "random_pixels": rng.choice(inside, count, replace=False)}
        for first in (0.5, 0.25):
            step = inside[np.argsort(-cam, kind="stable")[:int(round(first * count))]]
            second = at_image(explain_pixels(predictor, predictor.to_pixels(grey(step))[None], explanation.label)[0])
            second[step] = np.inf
            chosen[f"pixels-{first}"] = inside[np.argsort(-second[inside], kind="stable")[:count]]
        pixels = predictor.to_pixels(picture)[None]
        for name, steps in {"cells-3": [3], "cells-5": [5], "cells-7": [7], "cells-3x2": [3, 3],
                            "cells-5x2": [5, 5]}.items():
            heat = at_image(cells_grid(predictor, pixels, explanation.label, steps))[inside]
            chosen[name] = inside[np.argsort(-heat, kind="stable")[:count]]
        for name, where in chosen.items():
            drops.setdefault(name, []).append(before - probability(grey(where)))
    baseline = float(np.mean(drops["random_pixels"]))
    return {name: {"mean_drop": round(float(np.mean(d)), 4),
                   "over_random_pixels": round(float(np.mean(d)) / baseline, 2)} for name, d in drops.items()}


def main() -> None:
    args = arguments()
    with trained_model(args) as (clf, predictor, files):
        print(json.dumps({"data": str(args.data), "cpu": cpu_name(), "test_accuracy": clf.metrics_["test"]["accuracy"],
                          "deletion_at_image_size": run(predictor, files, args.seed)}))


if __name__ == "__main__":
    main()
