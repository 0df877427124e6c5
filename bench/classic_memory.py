"""Peak memory (RSS) of `tlearn train` with a classic backbone, on a 200-image real subset of hymenoptera.

Random weights in the torchvision layout stand in for the ImageNet ones (same tensors, same memory; no network
here). Usage, from the repo root:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/classic_memory.py vgg16 [--images 200] [--batch-size 32]

The datasets folder is ../shared/datasets next to the repo, or $TLEARN_DATASETS. It prints the exact
`/usr/bin/time -v tlearn train ...` command it ran, and its peak RSS and wall time.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

DATASETS = Path(os.environ.get("TLEARN_DATASETS") or Path(__file__).resolve().parents[2] / "shared" / "datasets")
HYMENOPTERA = DATASETS / "hymenoptera"
TORCHVISION = {"vgg16": torchvision.models.vgg16, "vgg19": torchvision.models.vgg19,
               "resnet50": torchvision.models.resnet50}


def subset(root: Path, images: int) -> Path:
    """ROOT/<class>/ with images/2 symlinks per class from hymenoptera's train split (no copies)."""
    for cls in ("ants", "bees"):
        (root / cls).mkdir(parents=True)
        files = sorted((HYMENOPTERA / "train" / cls).iterdir())[: images // 2]
        for src in files:
            (root / cls / src.name).symlink_to(src.resolve())
    return root


def tree_pss_kb(pid: int) -> int:
    """Proportional set size of a process and all its descendants (DataLoader workers included), in kB."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
            total += int(re.search(r"^Pss:\s+(\d+) kB", rollup, re.M).group(1))
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, AttributeError):
            pass  # the process ended meanwhile
    return total


def run_sampled(command: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run `command`, sampling its process tree's PSS every 0.2 s; return the result and the peak (kB)."""
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        peak = 0
        while process.poll() is None:
            peak = max(peak, tree_pss_kb(process.pid))
            time.sleep(0.2)
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess(command, process.returncode, stdout.read(), stderr.read()), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbone", choices=sorted(TORCHVISION))
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--engine", default="auto", help="tlearn train --engine (auto: the fastest installed)")
    args = parser.parse_args()
    if not HYMENOPTERA.is_dir():
        sys.exit(f"{HYMENOPTERA} is absent: this benchmark needs the shared hymenoptera dataset")
    with tempfile.TemporaryDirectory(prefix="tlearn-bench-") as scratch:
        scratch = Path(scratch)
        data = subset(scratch / "data", args.images)
        weights = scratch / f"{args.backbone}.pth"
        torch.save(TORCHVISION[args.backbone](weights=None).state_dict(), weights)
        command = ["/usr/bin/time", "-v", str(Path(sys.executable).parent / "tlearn"), "train", str(data),
                   "--backbone", args.backbone, "--weights", str(weights), "--batch-size", str(args.batch_size),
                   "--engine", args.engine,
                   "--out", str(scratch / "model"), "--cache-dir", str(scratch / "cache"), "--quiet"]
        print("$", " ".join(command))
        run, peak_pss_kb = run_sampled(command)
        print(run.stdout)
        if run.returncode:
            sys.exit(run.stderr)
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
        wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", run.stderr).group(1)
        print(f"{args.backbone}: {args.images} images, batch {args.batch_size}, engine {args.engine}: "
              f"peak RSS {peak_kb / 1024**2:.2f} GiB "
              f"(largest single process), peak PSS of the whole process tree {peak_pss_kb / 1024**2:.2f} GiB, "
              f"wall {wall}")


if __name__ == "__main__":
    main()
