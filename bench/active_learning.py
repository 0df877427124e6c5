"""Issue 21's active-learning bar, simulated on a dataset's cached features: start from 10% of train labelled,
5 rounds of another 10% each, picked at random, by margin, or by margin + diversity (tlearn predict --rank's
ranked batch-mode); test accuracy after each round, mean of 3 seeds, all in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/active_learning.py oxford17flowers [--cache-dir DIR]

The head after each round is tlearn's linear head at one fixed strength (C=1000, the strength CV picks on the
full oxford17flowers train) so that the strategies differ only in what they pick.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from bench_data import SHARED, dataset_arguments

from tlearn.evaluate.acquisition import rank_for_labelling
from tlearn.train.choices import C_GRID
from tlearn.train.head import fit_path

STRATEGIES = ("random", "margin", "margin+diversity")


def features_of(data: Path, cache: Path):
    import tlearn
    from tlearn.features import FeatureCache
    from tlearn.features.extract import extract_features

    clf = tlearn.ImageClassifier(cache_dir=cache, progress=False).fit(data)  # extracts (and caches) every split
    bundle, out = clf.bundle_, {}
    for split in ("train", "test"):
        rows = bundle.split["files"][split]
        with FeatureCache(bundle.backbone.feature_key, cache) as fc:
            f = extract_features([data / p for p, _ in rows], fc, None, bundle.preprocessing, progress=False)
        out[split] = (f.vectors, np.array([label for _, label in rows])[f.kept])
    return out, len(bundle.classes)


def head_at(x, y, k, C=1000.0):
    *_, (_, head) = fit_path(x, y, k, [c for c in C_GRID if c <= C])
    return head


def simulate(data, k, strategy, seed, rounds=5, share=0.1):
    (x, y), (xt, yt) = data["train"], data["test"]
    rng = np.random.default_rng(seed)
    n, step = len(y), round(share * len(y))
    labelled = np.zeros(n, bool)
    labelled[rng.choice(n, step, replace=False)] = True
    accuracies = []
    for _ in range(rounds):
        head = head_at(x[labelled], y[labelled], k)
        pool = np.flatnonzero(~labelled)
        if strategy == "random":
            picks = rng.choice(pool, step, replace=False)
        else:
            logits = head.logits(x[pool])
            proba = np.exp(logits - logits.max(1, keepdims=True))
            proba /= proba.sum(1, keepdims=True)
            ranked = rank_for_labelling(x[pool], proba, x[labelled] if strategy != "margin" else None,
                                        diverse=step if strategy != "margin" else 0)
            picks = pool[ranked.order[:step]]
        labelled[picks] = True
        accuracies.append(float((head_at(x[labelled], y[labelled], k).logits(xt).argmax(1) == yt).mean()))
    return accuracies


def main() -> None:
    args = dataset_arguments().parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data, k = features_of(SHARED / args.dataset, args.cache_dir or Path(scratch) / "cache")
    print(f"{args.dataset}: {len(data['train'][1])} train, {len(data['test'][1])} test; test accuracy after each "
          "round (labelled share), mean of seeds 0-2")
    results = {s: np.mean([simulate(data, k, s, seed) for seed in range(3)], axis=0) for s in STRATEGIES}
    print("| strategy | " + " | ".join(f"{20 + 10 * r}%" for r in range(5)) + " |")
    print("|---|" + "---|" * 5)
    for s, row in results.items():
        print(f"| {s} | " + " | ".join(f"{a:.4f}" for a in row) + " |")
    for s in STRATEGIES[1:]:
        above = all(a > b for a, b in zip(results[s], results["random"]))
        print(f"{s} above random after every round: {above}")


if __name__ == "__main__":
    main()
