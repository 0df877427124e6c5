"""Issue 21's suspect-label bar: seeded label flips in a dataset's train split, then `tlearn doctor --labels --json`.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/suspect_labels.py oxford17flowers [--flip 0.05] [--seed 0]

Builds a copy of DATA's train/ and test/ of symbolic links (the files are not copied) in which a seeded `--flip`
share of train's images sit in a wrong class folder (a uniformly drawn other class), then runs the doctor twice on
one cache: the first run extracts the features, the second is timed on the warm cache. Prints the share of the
flipped files among the first 2 x N suspects (N = flipped files) and among all suspects, and the seconds.
Bars (issue 21): >= 80% among the first 2 x N, under 60 s warm.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_data import SHARED, dataset_arguments


def flipped_copy(data: Path, out: Path, share: float, seed: int) -> set[str]:
    """`out` mirrors `data` with links; `share` of train's images moved to another class. Returns their paths."""
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in (data / "train").iterdir() if p.is_dir())
    files = [(c, f) for c in classes for f in sorted((data / "train" / c).iterdir())]
    chosen = set(rng.choice(len(files), size=round(share * len(files)), replace=False).tolist())
    flipped = set()
    for split in [s.name for s in data.iterdir() if s.is_dir()]:
        for c in classes:
            (out / split / c).mkdir(parents=True, exist_ok=True)
    for i, (c, f) in enumerate(files):
        target = c
        if i in chosen:
            target = rng.choice([o for o in classes if o != c])
            flipped.add(f"train/{target}/{f.name}")
        os.symlink(f, out / "train" / target / f.name)
    for split in (s for s in data.iterdir() if s.is_dir() and s.name != "train"):
        for c in classes:
            for f in sorted((split / c).iterdir()):
                os.symlink(f, out / split.name / c / f.name)
    return flipped


def main() -> None:
    parser = dataset_arguments()
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = SHARED / args.dataset
        noisy = scratch / "noisy"
        flipped = flipped_copy(data, noisy, args.flip, args.seed)
        cache = args.cache_dir or scratch / "cache"
        command = [sys.executable, "-m", "tlearn.cli", "doctor", str(noisy), "--labels", "--json", "--quiet",
                   "--cache-dir", str(cache)]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=scratch)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=scratch)
        warm = time.perf_counter() - start
        report = json.loads(done.stdout)
        ranked = [row["path"] for row in report["rows"]]
        n = len(flipped)
        top = set(ranked[: 2 * n])
        print(f"{args.dataset}: {n} of {report['images']} train labels flipped (seed {args.seed}); "
              f"{report['suspects']} suspects from {report['source']}")
        print(f"flipped among the first 2N={2 * n} suspects: {len(top & flipped)}/{n} = {len(top & flipped) / n:.3f}; "
              f"among all suspects: {len(set(ranked) & flipped) / n:.3f}; first N precision "
              f"{len(set(ranked[:n]) & flipped) / n:.3f}")
        print(f"doctor --labels: {cold:.1f} s with extraction, {warm:.1f} s on the warm cache (whole process)")


if __name__ == "__main__":
    main()
