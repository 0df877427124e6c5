"""`train --ray` vs a local train: the same metrics? (issue 12's train bar)

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ray_train.py [--data ../shared/datasets/oxford17flowers] [--ray local]

Two fresh feature caches, so both trains export the engine and extract every image. Local:
ImageClassifier(cache_dir=A).fit(DATA). Ray: ImageClassifier(cache_dir=B, ray=...).fit(DATA), which is `tlearn
train DATA --ray ...`: Ray actors fill cache B, then the head is fitted as usual. Prints both trains' seconds and
metrics, whether the metrics are identical, and the largest difference between the two caches' features.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

DATASETS = Path(os.environ.get("TLEARN_DATASETS", Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"))


def train(data: Path, cache_dir: Path, ray: str | None):
    import tlearn

    start = time.perf_counter()
    clf = tlearn.ImageClassifier(cache_dir=cache_dir, progress=False, ray=ray).fit(data)
    return clf, round(time.perf_counter() - start, 1)


def max_feature_difference(key: str, a: Path, b: Path, data: Path) -> float:
    """Largest absolute difference between two caches' vectors of the same images."""
    import numpy as np

    from tlearn.data.decode import content_hash
    from tlearn.features import FeatureCache

    hashes = [h for h in (content_hash(p) for p in data.rglob("*") if p.is_file()) if h]
    with FeatureCache(key, a) as first, FeatureCache(key, b) as second:
        va, vb = first.get_many(hashes), second.get_many(hashes)
    return float(max(np.abs(va[h] - vb[h]).max() for h in va if h in vb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATASETS / "oxford17flowers")
    parser.add_argument("--ray", default="local", help="local, auto or an address")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlearn-ray-train-") as tmp:
        local_cache, ray_cache = Path(tmp) / "local", Path(tmp) / "ray"
        local, local_seconds = train(args.data, local_cache, None)
        on_ray, ray_seconds = train(args.data, ray_cache, args.ray)
        key = local.bundle_.backbone.feature_key
        print(json.dumps({
            "local_train_seconds": local_seconds, "ray_train_seconds": ray_seconds,
            "extracted_locally_after_ray": on_ray.summary_.extracted,
            "metrics_identical": local.metrics_ == on_ray.metrics_,
            "max_feature_difference": max_feature_difference(key, local_cache, ray_cache, args.data),
            "accuracy (local, ray)": {s: (local.metrics_[s]["accuracy"], on_ray.metrics_[s]["accuracy"])
                                      for s in ("val", "test") if s in local.metrics_}}, indent=1))


if __name__ == "__main__":
    main()
