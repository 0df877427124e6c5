"""Memory of `tlearn train` with many classes (issue 13: 1,000 classes once reached 22 GB and was killed).

    .venv/bin/python bench/many_classes.py [--classes 1000] [--per-class 3]

Builds CLASSES folders of PER_CLASS distinct crops (96 px PNGs) of scikit-image's photos, then runs
`/usr/bin/time -v tlearn train` on them (flat layout: train/val/test carved) and prints its peak RSS and wall time.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "camera")


def build(root: Path, classes: int, per_class: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    photos = [np.asarray(Image.fromarray(getattr(skdata, name)()).convert("RGB")) for name in PHOTOS]
    for c in range(classes):
        folder = root / f"class_{c:04d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            photo = photos[rng.integers(len(photos))]
            size = int(rng.integers(64, 200))
            top, left = (int(rng.integers(0, photo.shape[k] - size)) for k in (0, 1))
            crop = Image.fromarray(photo[top:top + size, left:left + size]).resize((96, 96))
            crop.save(folder / f"{i}.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        data = build(Path(work) / "data", args.classes, args.per_class)
        command = ["/usr/bin/time", "-v", str(Path(sys.executable).parent / "tlearn"), "train", str(data),
                   "--out", str(Path(work) / "model"), "--cache-dir", str(Path(work) / "cache"), "--quiet"]
        print("$", " ".join(command), flush=True)
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode:
            sys.exit(run.stderr[-3000:])
        peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
        wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", run.stderr).group(1)
        print(f"{args.classes} classes x {args.per_class} images: peak RSS {peak_kb / 1024 ** 2:.2f} GiB, wall {wall}")


if __name__ == "__main__":
    main()
