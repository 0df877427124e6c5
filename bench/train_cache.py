"""Issue 2 bars: `tlearn train` on the shared datasets, cold feature cache then warm, wall time and accuracy.

    .venv/bin/python bench/train_cache.py [--datasets hymenoptera oxford17flowers] [--backbone efficientnet_lite0]

Each dataset is trained twice with the same fresh cache folder, as two real `tlearn train` processes; the table
gives wall time of each, the speed-up of the second, extraction images/s and the metrics of both runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def run_train(data: Path, out: Path, cache: Path, backbone: str) -> tuple[float, dict, str]:
    exe = Path(sys.executable).with_name("tlearn")
    env = {**os.environ, "TLEARN_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([str(exe), "train", str(data), "--out", str(out), "--backbone", backbone, "-q"],
                          env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    return seconds, json.loads((out / "metrics.json").read_text()), done.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=["hymenoptera", "oxford17flowers"])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print("| dataset | run | wall s | val acc | test acc | extraction |")
    print("|---|---|---|---|---|---|")
    for name in args.datasets:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            cold_s, cold, cold_out = run_train(SHARED / name, tmp / "m1", tmp / "cache", args.backbone)
            warm_s, warm, _ = run_train(SHARED / name, tmp / "m2", tmp / "cache", args.backbone)
            rate = next((line.split("(")[1].split(")")[0] for line in cold_out.splitlines()
                         if "img/s" in line), "?")
            for label, secs, m in (("cold cache", cold_s, cold), ("warm cache", warm_s, warm)):
                test = f"{m['test']['accuracy']:.4f}" if "test" in m else "-"
                print(f"| {name} | {label} | {secs:.1f} | {m['val']['accuracy']:.4f} | {test} | "
                      f"{rate if label == 'cold cache' else 'all from cache'} |")
            print(f"| {name} | speed-up | {cold_s / warm_s:.1f}x | same metrics: {cold == warm} | | |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
