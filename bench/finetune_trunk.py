"""Issue 14 bar: the full-image fine-tuning loop against the cached-trunk loop, in ONE process, in the same run.

    TLEARN_DATASETS=/work/shared/datasets .venv/bin/python bench/finetune_trunk.py oxford17flowers
    .venv/bin/python bench/finetune_trunk.py digits            # far from ImageNet (tlearn.data.far_sets)
    .venv/bin/python bench/finetune_trunk.py digits --per-class 12 --epochs 1   # a quick check that it runs

Both loops run the same recipe (tlearn.train.recipe.fine_tune_stage: inner split carved from train, head refitted
without it, the same epochs, lr, views/augmentation "flip", early stopping on the inner split) from the same
pretrained backbone, with a fresh trunk cache; only the input differs: images decoded and augmented every epoch,
or the frozen trunk's cached activations of 6 fixed views per image. Prints one JSON line per loop (wall time, the
trunk cache's build time, seconds per epoch, val and test accuracy with the bootstrap 95% interval, the stage the
inner split chose) and one with the ratios. The machine's load average is printed too: the cores may be shared.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from tlearn.backbones import create_backbone, get_spec
from tlearn.data import find_dataset
from tlearn.data.far_sets import make_digits_dataset
from tlearn.evaluate import classification_metrics
from tlearn.train.head import LinearHead
from tlearn.train.recipe import fine_tune_stage
from tlearn.train.settings import FinetuneSettings

SHARED = Path(os.environ.get("TLEARN_DATASETS", Path(__file__).resolve().parents[1].parent / "shared" /
                             "datasets"))


def run_loop(name: str, dataset, backbone, settings: FinetuneSettings, cache: Path) -> dict:
    classes = dataset.classes
    head = LinearHead(np.zeros((len(classes), 1280), np.float32), np.zeros(len(classes), np.float32))  # refitted
    start = time.perf_counter()
    tuned = fine_tune_stage(dataset, get_spec("efficientnet_lite0"), copy.deepcopy(backbone), head, settings,
                            None, cache_dir=cache, batch_size=settings.batch_size, progress=False)
    wall = time.perf_counter() - start
    result = tuned.result
    epochs = [row["seconds"] for row in result.history]
    scored = {split: classification_metrics(tuned.labels[split], x.argmax(1), classes)
              for split, x in tuned.logits.items()}
    return {"loop": name, "inputs": result.inputs, "precision": result.precision, "wall_seconds": round(wall, 1),
            "fit_seconds": round(result.seconds, 1), "before_fit_seconds": round(wall - result.seconds, 1),
            "epochs_run": len(epochs), "best_epoch": result.best_epoch,
            "seconds_per_epoch": round(statistics.mean(epochs), 2),
            "seconds_per_epoch_after_first": round(statistics.mean(epochs[1:]), 2) if len(epochs) > 1 else None,
            **{f"{split}_accuracy": m["accuracy"] for split, m in scored.items()},
            **{f"{split}_ci95": m["ci95"].get("accuracy") for split, m in scored.items()},
            "inner_choice": tuned.choice.to_dict(), "notes": result.notes, "history": result.history,
            "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", help="oxford17flowers, hymenoptera (under $TLEARN_DATASETS), digits, or a path")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--views", type=int, default=6)
    parser.add_argument("--per-class", type=int, help="digits only: a seeded sample per class (quick check)")
    parser.add_argument("--loops", default="images,trunk", help="which loops, in this order")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.dataset == "digits":
            data = make_digits_dataset(tmp / "digits", per_class=args.per_class)
        else:
            data = Path(args.dataset) if Path(args.dataset).is_dir() else SHARED / args.dataset
        dataset = find_dataset(data, 0, 0.15, 0.15)
        backbone, _ = create_backbone("efficientnet_lite0")
        rows = {}
        for loop in args.loops.split(","):
            settings = FinetuneSettings(epochs=args.epochs, batch_size=args.batch_size, views=args.views,
                                        trunk_cache=loop == "trunk", patience=args.epochs)  # every epoch runs
            rows[loop] = run_loop(loop, dataset, backbone, settings, tmp / "cache")
            print(json.dumps({"dataset": args.dataset, **rows[loop]}), flush=True)
    if {"images", "trunk"} <= rows.keys():
        full, cached = rows["images"], rows["trunk"]
        print(json.dumps({"dataset": args.dataset,
                          "epoch_speedup": round(full["seconds_per_epoch"] / cached["seconds_per_epoch"], 2),
                          "wall_speedup": round(full["wall_seconds"] / cached["wall_seconds"], 2),
                          "test_accuracy": {k: r.get("test_accuracy") for k, r in rows.items()}}))


if __name__ == "__main__":
    main()
