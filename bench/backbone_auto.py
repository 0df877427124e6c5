"""Issue 14: `--backbone auto` (a head on each of efficientnet_lite0/1/2, the best on an inner split of train kept):
what it costs, what it keeps, and each backbone's own val/test for comparison.

    TLEARN_DATASETS=/work/shared/datasets .venv/bin/python bench/backbone_auto.py hymenoptera
    TLEARN_DATASETS=/work/shared/datasets .venv/bin/python bench/backbone_auto.py oxford17flowers
    .venv/bin/python bench/backbone_auto.py digits --per-class 20        # a quick check that it runs

Into one fresh cache folder (or --cache-dir): `auto` once (every backbone's features extracted), `auto` again (all
cached: the re-run's cost), then each backbone alone (from the cache) for its val and test. One JSON line each.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bench_data import dataset_and_cache, dataset_arguments

import tlearn
from tlearn.train.settings import AUTO_BACKBONES


def train(data: Path, backbone: str, cache: Path) -> dict:
    start = time.perf_counter()
    clf = tlearn.ImageClassifier(backbone, cache_dir=cache, progress=False).fit(data)
    return {"backbone": backbone, "kept": clf.bundle_.backbone.name, "val": clf.metrics_["val"]["accuracy"],
            "test": clf.metrics_.get("test", {}).get("accuracy"), "seconds": round(time.perf_counter() - start, 2),
            "extracted": clf.summary_.extracted, "choice": clf.summary_.backbone_choice}


def main() -> None:
    args = dataset_arguments().parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = dataset_and_cache(args, Path(tmp))
        for run, backbone in (("first", "auto"), ("cached", "auto"), *(("alone", name) for name in AUTO_BACKBONES)):
            print(json.dumps({"dataset": args.dataset, "run": run, **train(data, backbone, cache)}), flush=True)


if __name__ == "__main__":
    main()
