"""Issue 14: does the image's mirror pay for the default head, measured through `tlearn train` itself?

    TLEARN_DATASETS=/work/shared/datasets .venv/bin/python bench/head_tta.py hymenoptera
    TLEARN_DATASETS=/work/shared/datasets .venv/bin/python bench/head_tta.py oxford17flowers
    .venv/bin/python bench/head_tta.py digits
    .venv/bin/python bench/head_tta.py digits --per-class 20        # a quick check that it runs

Into one fresh cache folder (or --cache-dir), the head is trained with each `--mirror` setting: off first (the
image's features are extracted), then auto (the mirrors' are extracted too; the recipe is chosen on an inner split
of train), then train, tta and both (from the cache). Each is trained twice: the second is a cached re-train, whose
time the mirror must not spoil. Last, val is predicted (Predictor.iter_files, as `tlearn predict`) by the off model
and by a tta model. One JSON line per setting, then one for prediction.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_data import dataset_and_cache, dataset_arguments

import tlearn
from tlearn.predict import Predictor

SETTINGS = ("off", "auto", "train", "tta", "both")


def train(data: Path, mirror: str, cache: Path) -> tuple[tlearn.ImageClassifier, float]:
    start = time.perf_counter()
    clf = tlearn.ImageClassifier(cache_dir=cache, progress=False, mirror=mirror).fit(data)
    return clf, time.perf_counter() - start


def row(clf: tlearn.ImageClassifier, first: float, again: float, mirror: str) -> dict:
    views, summary = clf.bundle_.training["views"], clf.summary_
    return {"mirror": mirror, "chosen": views["chosen"], "inner_scores": views["scores"],
            "choice_seconds": round(views["seconds"], 3), "val": clf.metrics_["val"]["accuracy"],
            "test": clf.metrics_.get("test", {}).get("accuracy"), "extracted": summary.extracted,
            "extract_seconds": round(summary.extract_seconds, 1), "fit_seconds": round(first, 2),
            "cached_refit_seconds": round(again, 2), "forwards_per_image": views["forwards_per_image"]}


def prediction_seconds(clf: tlearn.ImageClassifier, files: list[Path]) -> tuple[float, float]:
    """Seconds of `tlearn predict`'s pipeline over `files` (decoding included), and the best of 3 forward passes
    (engine and head only) over the first 64 of them, already decoded."""
    predictor = Predictor.from_bundle(clf.bundle_)
    list(predictor.iter_files(files[:8]))  # warm-up: engine compiled, threads started
    start = time.perf_counter()
    list(predictor.iter_files(files))
    whole = time.perf_counter() - start
    pixels = np.stack([predictor.to_pixels(f) for f in files[:64]])
    forwards = []
    for _ in range(3):
        start = time.perf_counter()
        predictor.probabilities(pixels)
        forwards.append((time.perf_counter() - start) / len(pixels))
    return whole / len(files), min(forwards)


def main() -> None:
    args = dataset_arguments().parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = dataset_and_cache(args, Path(tmp))
        models = {}
        for mirror in SETTINGS:
            models[mirror], first = train(data, mirror, cache)
            _, again = train(data, mirror, cache)
            print(json.dumps({"dataset": args.dataset, **row(models[mirror], first, again, mirror)}), flush=True)
        files = [Path(p) for p in models["off"].scored_splits(splits=("val",))["val"].paths]
        costs = {m: prediction_seconds(models[m], files) for m in ("off", "tta")}
        print(json.dumps({"dataset": args.dataset, "predicted": len(files),
                          **{f"{m}_ms_per_image": round(1000 * whole, 2) for m, (whole, _) in costs.items()},
                          **{f"{m}_forward_ms_per_image": round(1000 * f, 2) for m, (_, f) in costs.items()}}))


if __name__ == "__main__":
    main()
