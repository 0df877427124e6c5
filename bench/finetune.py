"""Issue 3 bars: `tlearn train --fine-tune` on the shared datasets and on a far-from-ImageNet set, head vs fine-tuned.

    .venv/bin/python bench/finetune.py oxford17flowers [--precision auto] [-- extra tlearn train flags]
    .venv/bin/python bench/finetune.py hymenoptera
    .venv/bin/python bench/finetune.py digits        # scikit-learn's 8x8 handwritten digits, upscaled to 64x64 PNGs

One real `tlearn train` process per run, with a fresh feature cache (wall time includes feature extraction, the
decode of every image and both stages). Prints one JSON line: wall time, per-stage val/test accuracy, epochs, time
per epoch, CPU seconds (the 2 cores are shared), the precision used and the per-epoch history.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tlearn.data.far_sets import make_digits_dataset

SHARED = Path(os.environ.get("TLEARN_DATASETS", Path(__file__).resolve().parents[1].parent / "shared" /
                             "datasets"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    parser.add_argument("--precision", default="auto", help="Lightning precision of the fine-tune (--train-precision)")
    parser.add_argument("--keep", type=Path, help="write the model here instead of a temporary folder")
    parser.add_argument("extra", nargs="*", help="more `tlearn train` flags (after --)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_digits_dataset(tmp / "digits") if args.dataset == "digits" else SHARED / args.dataset
        out = args.keep or tmp / "model"
        command = [sys.executable, "-m", "tlearn.cli", "train", str(data), "--out", str(out), "-q",
                   "--cache-dir", str(tmp / "cache"), "--fine-tune", "--train-precision", args.precision, *args.extra]
        start = time.perf_counter()
        # TLEARN_CACHE too: the fine-tune's trunk cache starts empty as the feature cache does
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TLEARN_CACHE": str(tmp / "cache")}
        subprocess.run(command, check=True, env=env)
        wall = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        metrics = json.loads((out / "metrics.json").read_text())
        config = json.loads((out / "config.json").read_text())
    ft = config["training"]["finetune"]
    print(json.dumps({
        "dataset": args.dataset, "command": " ".join(command[3:]), "wall_seconds": round(wall, 1),
        # the machine is shared: CPU seconds / 2 cores estimates the wall time on an idle machine
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "stages": {stage: {split: m[split]["accuracy"] for split in m} for stage, m in metrics["stages"].items()},
        "kept": ft["chosen"], "precision": ft["precision_used"], "epochs_run": ft["epochs_run"],
        "best_epoch": ft["best_epoch"], "finetune_seconds": round(ft["seconds"], 1),
        "seconds_per_epoch": round(ft["seconds"] / max(1, ft["epochs_run"]), 1),
        "load_average": os.getloadavg(), "history": config["extra"]["history"]}))


if __name__ == "__main__":
    main()
