"""What each backbone precision costs downstream: train a head on fp32 / bf16 / int8 features, compare accuracy.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/precision.py [--engine auto] [--precisions fp32 bf16 int8]

For hymenoptera (train/val) and oxford17flowers (train/test, val carved): `tlearn train DATA --precision P`; prints
val and test accuracy and the difference to fp32 in points. A precision may become the default only if it costs
< 0.5 point on both datasets.
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

DATASETS = Path(os.environ.get("TLEARN_DATASETS", Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"))
TLEARN = Path(sys.executable).parent / "tlearn"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"])
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        for name in ("hymenoptera", "oxford17flowers"):
            baseline = None
            for precision in args.precisions:
                out = Path(work) / f"{name}-{precision}"
                start = time.perf_counter()
                subprocess.run([str(TLEARN), "train", str(DATASETS / name), "--out", str(out), "--cache-dir",
                                str(Path(work) / "cache"), "--engine", args.engine, "--precision", precision, "-q"],
                               check=True, capture_output=True)
                metrics = json.loads((out / "metrics.json").read_text())
                split = "test" if "test" in metrics else "val"
                accuracy = metrics[split]["accuracy"]
                baseline = accuracy if baseline is None else baseline
                print(f"{name:16s} {precision:5s} {split} accuracy {accuracy:.4f}  "
                      f"({100 * (accuracy - baseline):+.2f} points vs {args.precisions[0]}, "
                      f"n={metrics[split]['n']}, {time.perf_counter() - start:.0f}s)", flush=True)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
