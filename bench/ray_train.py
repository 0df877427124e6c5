"""`train` with its features extracted on Ray vs a local train: the same metrics? (issue 12's train bar)

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ray_train.py [--data ../shared/datasets/oxford17flowers] [--ray local]

Two fresh feature caches. Local: ImageClassifier(cache_dir=A).fit(DATA). Ray: extract_features_ray fills cache B
(the engine exported and verified on the driver, actors open its files), then ImageClassifier(cache_dir=B).fit(DATA)
finds every feature cached and fits the head as usual: what `tlearn train DATA --ray` does. Prints both metrics,
whether they are identical, the largest feature difference, and the extraction times.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

DATASETS = Path(os.environ.get("TLEARN_DATASETS", Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"))


def ray_extract(data: Path, cache_dir: Path, address: str | None) -> tuple[dict, list[str]]:
    from tlearn.backbones import get_spec, locate_weights
    from tlearn.data import find_dataset
    from tlearn.data.decode import content_hashes
    from tlearn.distributed import extract_features_ray
    from tlearn.features import FeatureCache
    from tlearn.features.backbone import FrozenBackbone
    from tlearn.train.settings import TrainSettings
    from tlearn.train.steps import feature_key_for

    settings = TrainSettings(cache_dir=cache_dir, progress=False)
    dataset = find_dataset(data, settings.seed, settings.val_fraction, settings.test_fraction)
    paths = [s.path for samples in dataset.splits.values() for s in samples]
    hashes = content_hashes(paths)
    spec, info = get_spec(settings.backbone), locate_weights(settings.backbone)
    with FeatureCache(feature_key_for(settings), cache_dir) as cache:
        backbone = FrozenBackbone(spec, info, cache.key, cache, progress=False)
        start = time.perf_counter()
        done = extract_features_ray(paths, [hashes[p] for p in paths], backbone.engine_key,
                                    cache.directory / "engines", spec.preprocessing, cache, address,
                                    export=backbone.engine)
        facts = {"computed": done.computed, "failures": len(done.failures), "cores": done.cores,
                 "seconds_with_export": round(time.perf_counter() - start, 1)}
        return facts, [h for h in hashes.values() if h is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATASETS / "oxford17flowers")
    parser.add_argument("--ray", default="local", help="local, auto or an address")
    args = parser.parse_args()
    import tlearn
    from tlearn.features import FeatureCache

    with tempfile.TemporaryDirectory(prefix="tlearn-ray-train-") as tmp:
        local_cache, ray_cache = Path(tmp) / "local", Path(tmp) / "ray"
        start = time.perf_counter()
        local = tlearn.ImageClassifier(cache_dir=local_cache, progress=False).fit(args.data)
        local_seconds = time.perf_counter() - start
        extraction, hashes = ray_extract(args.data, ray_cache, None if args.ray == "local" else args.ray)
        on_ray = tlearn.ImageClassifier(cache_dir=ray_cache, progress=False).fit(args.data)
        key = local.bundle_.backbone.feature_key
        with FeatureCache(key, local_cache) as a, FeatureCache(key, ray_cache) as b:
            diff = _max_difference(a, b, hashes)
        print(json.dumps({"local_train_seconds": round(local_seconds, 1), "ray_extraction": extraction,
                          "ray_train_extracted_after_ray": on_ray.summary_.extracted,
                          "metrics_identical": local.metrics_ == on_ray.metrics_,
                          "max_feature_difference": diff,
                          "accuracy": {s: (local.metrics_[s]["accuracy"], on_ray.metrics_[s]["accuracy"])
                                       for s in ("val", "test") if s in local.metrics_}}, indent=1))


def _max_difference(a, b, hashes: list[str]) -> float | None:
    """Largest absolute difference between the two caches' vectors of the same content."""
    import numpy as np

    va, vb = a.get_many(hashes), b.get_many(hashes)
    common = [c for c in va if c in vb]
    if not common:
        return None
    return float(max(np.abs(va[c] - vb[c]).max() for c in common))


if __name__ == "__main__":
    main()
