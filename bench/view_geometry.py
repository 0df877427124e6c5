"""Issue 20: does the frozen backbone's view of an image (input size, centre-crop fraction) change the head?

    HF_HUB_OFFLINE=1 .venv/bin/python bench/view_geometry.py hymenoptera oxford17flowers [--backbone B]

For each geometry (input size x crop_pct), pooled features of every image of the data's splits (eager torch, fp32,
the shipped weights), then the default head's choice by 5-fold cross-validation on train (tlearn.train.choices: the
same folds and grid as `tlearn train`), refit on all of train, and the reported split's accuracy. The choosing
figure is the out-of-fold log loss on train; the reported split never chooses. One JSON line per (data, geometry).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

DATASETS = Path(os.environ.get("TLEARN_DATASETS", Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"))
GEOMETRIES = ((224, 0.875), (224, 1.0), (256, 0.875), (256, 1.0), (288, 1.0))


def features(model, prep, paths: list[Path]) -> np.ndarray:
    import torch
    from PIL import Image

    def pixels(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            image.draft("RGB", prep.draft_size())
            return prep.to_pixels(image.convert("RGB"))

    out = []
    with ThreadPoolExecutor(2) as pool, torch.inference_mode():
        for start in range(0, len(paths), 64):
            batch = np.stack(list(pool.map(pixels, paths[start:start + 64])))
            out.append(model(prep.normalise(torch.from_numpy(batch))).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", nargs="+")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from tlearn.backbones import create_backbone, get_spec
    from tlearn.data import find_dataset
    from tlearn.train.choices import Candidate, choose_head, make_folds, refit

    torch.set_num_threads(2)
    model, _ = create_backbone(args.backbone)
    base = get_spec(args.backbone).preprocessing
    for name in args.data:
        dataset = find_dataset(DATASETS / name, args.seed)
        reported = "test" if "test" in dataset.splits else "val"
        y, y_rep = dataset.labels("train"), dataset.labels(reported)
        folds = make_folds(y, dataset.train_groups(), dataset.classes, args.seed)
        for size, crop in GEOMETRIES:
            prep = replace(base, input_size=size, crop_pct=crop)
            start = time.perf_counter()
            x, x_rep = features(model, prep, dataset.paths("train")), features(model, prep, dataset.paths(reported))
            seconds = time.perf_counter() - start
            candidate = Candidate("off", x)
            choice = choose_head(candidate, y, folds, len(dataset.classes))
            head = refit(candidate, y, choice, len(dataset.classes))
            accuracy = float((head.logits(x_rep).argmax(1) == y_rep).mean())
            print(json.dumps({"data": name, "backbone": args.backbone, "input_size": size, "crop_pct": crop,
                              "cv_log_loss": round(choice.score, 4), "cv_accuracy": round(choice.accuracy, 4),
                              "C": choice.C, reported: round(accuracy, 4), "n_" + reported: len(y_rep),
                              "extract_seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
