"""Issue 21, heat maps: are they faithful, and what do they cost next to a prediction?

    .venv/bin/python bench/explain.py [--data ../shared/datasets/oxford17flowers] [--images 50]

Trains the default head on the data (into a temporary model folder; the feature cache makes a second run quick),
then, on a seeded sample of test images:
- deletion test: grey (128) the 20% of the model's pixels (its centre crop) with the highest heat of the top-1
  class, and separately a random 20% (seeded): scattered pixels, and smooth random blobs (the top 20% of a random
  grid of the heat map's resolution, upsampled as the heat is); the mean drop of that class's calibrated
  probability for each. Bar: the heat's drop is at least twice the random one.
- the same deletion at the image's own size, as a user holds it: the file decoded whole (EXIF-rotated RGB), the
  20% of the centre crop's pixels with the highest heat (`Predictor.explain(...).heat`, at the image's size) greyed,
  against a random 20% of the crop's pixels (scattered, and blobs as above), each then predicted from the array.
- cost: per image, the median time of `Predictor.predict([path])` and of `Predictor.explain(path)` with its heat at
  the image's size (both decode the file), after a warm-up. Bar: explain <= 2x predict.
One JSON line.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

import tlearn
from tlearn.explain import explain_pixels, upsample
from tlearn.predict import Predictor

GREY, FRACTION = 128, 0.2


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def greyed(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = pixels.copy()
    out[:, :, mask] = GREY
    return out


def deletion(predictor: Predictor, files: list[Path], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    size = predictor.input_size
    count = int(round(FRACTION * size * size))
    heat_drops, random_drops, blob_drops = [], [], []
    for file in files:
        pixels = predictor.to_pixels(file)[None]
        grid, probabilities, index = explain_pixels(predictor, pixels)
        heat = upsample(grid, (size, size)).ravel()
        hottest = np.zeros(size * size, bool)
        hottest[np.argsort(-heat, kind="stable")[:count]] = True
        anywhere = np.zeros(size * size, bool)
        anywhere[rng.choice(size * size, count, replace=False)] = True
        blob = np.zeros(size * size, bool)  # random, but as smooth as a heat map: a random grid, upsampled
        noise = upsample(rng.random(grid.shape).astype(np.float32), (size, size)).ravel()
        blob[np.argsort(-noise, kind="stable")[:count]] = True
        batch = np.concatenate([greyed(pixels, m.reshape(size, size)) for m in (hottest, anywhere, blob)])
        after = predictor.probabilities(batch)[:, index]
        heat_drops.append(probabilities[index] - after[0])
        random_drops.append(probabilities[index] - after[1])
        blob_drops.append(probabilities[index] - after[2])
    return summary(len(files), heat_drops, random_drops, blob_drops)


def summary(images: int, heat_drops: list, pixel_drops: list, blob_drops: list) -> dict:
    """Mean drops of the class's probability, and the heat's over each random baseline's."""
    heat_drop, pixel_drop, blob_drop = (float(np.mean(d)) for d in (heat_drops, pixel_drops, blob_drops))
    return {"images": images, "mean_drop_heat": round(heat_drop, 4),
            "mean_drop_random_pixels": round(pixel_drop, 4), "ratio_random_pixels": round(heat_drop / pixel_drop, 2),
            "mean_drop_random_blobs": round(blob_drop, 4), "ratio_random_blobs": round(heat_drop / blob_drop, 2)}


def deletion_at_image_size(predictor: Predictor, files: list[Path], seed: int) -> dict:
    from PIL import Image, ImageOps

    rng = np.random.default_rng(seed)
    drops: dict[str, list[float]] = {"heat": [], "random_pixels": [], "random_blobs": []}
    for file in files:
        with Image.open(file) as opened:
            picture = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
        explanation = predictor.explain(picture)
        index = predictor.classes.index(explanation.label)
        before = float(predictor.probabilities(predictor.to_pixels(picture)[None])[0, index])
        left, top, right, bottom = explanation.box
        crop = np.zeros(picture.shape[:2], bool)
        crop[top:bottom, left:right] = True
        inside = np.flatnonzero(crop.ravel())
        count = int(round(FRACTION * inside.size))
        heat = explanation.heat.ravel()[inside]
        noise = np.zeros(picture.shape[:2], np.float32)
        noise[top:bottom, left:right] = upsample(rng.random(explanation.grid.shape).astype(np.float32),
                                                 (right - left, bottom - top))
        chosen = {"heat": inside[np.argsort(-heat, kind="stable")[:count]],
                  "random_pixels": rng.choice(inside, count, replace=False),
                  "random_blobs": inside[np.argsort(-noise.ravel()[inside], kind="stable")[:count]]}
        for name, where in chosen.items():
            out = picture.copy().reshape(-1, 3)
            out[where] = GREY
            after = predictor.probabilities(predictor.to_pixels(out.reshape(picture.shape))[None])[0, index]
            drops[name].append(before - float(after))
    return summary(len(files), drops["heat"], drops["random_pixels"], drops["random_blobs"])


def cost(predictor: Predictor, files: list[Path]) -> dict:
    predictor.predict(files[:2])
    predictor.explain(files[0]).heat  # opens and verifies the feature-map engine
    predict_s, explain_s = [], []
    for file in files:  # interleaved, so that load on the shared machine falls on both alike
        start = time.perf_counter()
        predictor.predict([file])
        predict_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        predictor.explain(file).heat
        explain_s.append(time.perf_counter() - start)
    p, e = float(np.median(predict_s)), float(np.median(explain_s))
    return {"predict_ms": round(p * 1000, 1), "explain_ms": round(e * 1000, 1), "ratio": round(e / p, 2),
            "engine": predictor.card.engine}


def arguments() -> argparse.Namespace:
    """The options of this script and of bench/deletion_greedy.py: the data, how many test images, seed, cache."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "datasets"
                        / "oxford17flowers")
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None)
    return parser.parse_args()


@contextmanager
def trained_model(args: argparse.Namespace) -> Iterator[tuple[tlearn.ImageClassifier, Predictor, list[Path]]]:
    """The default head trained on `args.data` (into a temporary model folder), its Predictor, and a seeded sample
    of `args.images` of its test images."""
    with tempfile.TemporaryDirectory() as folder:
        clf = tlearn.ImageClassifier(cache_dir=args.cache_dir, progress=False, seed=args.seed).fit(args.data)
        clf.save(Path(folder) / "model")
        test = clf.bundle_.split_files("test")
        order = np.random.default_rng(args.seed).permutation(len(test))[:args.images]
        yield clf, Predictor.load(Path(folder) / "model"), [test[i] for i in sorted(order)]


def main() -> None:
    args = arguments()
    with trained_model(args) as (clf, predictor, files):
        print(json.dumps({"data": str(args.data), "cpu": cpu_name(), "test_accuracy": clf.metrics_["test"]["accuracy"],
                          "deletion": deletion(predictor, files, args.seed),
                          "deletion_at_image_size": deletion_at_image_size(predictor, files, args.seed),
                          "cost": cost(predictor, files)}))


if __name__ == "__main__":
    main()
