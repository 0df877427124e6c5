"""What OpenVINO runs for each precision on this CPU, and how fast: the forward pass alone.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/openvino_precisions.py [--rounds 3] [--seconds 5]

EfficientNet-Lite0 backbone opened through tlearn.engines (openvino engine, fp32 / bf16 / int8 calibrated on 128
hymenoptera training images); prints the primitive types of the compiled convolutions (AMX or not) and images/s
on one batch of 32, the precisions interleaved round by round so that changes in the machine's load hit all three.
"""
from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from tlearn.backbones import create_backbone, get_spec
from tlearn.engines import open_engine, stream_pixels

DATASETS = Path(os.environ.get("TLEARN_DATASETS", Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"))


def convolution_primitives(engine) -> dict:
    kinds = collections.Counter()
    for op in engine.compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":
            kinds[f"{info['primitiveType'].astype(str)} ({info['runtimePrecision'].astype(str)})"] += 1
    return dict(kinds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    backbone, _ = create_backbone("efficientnet_lite0")
    preprocessing = get_spec("efficientnet_lite0").preprocessing
    train = sorted((DATASETS / "hymenoptera" / "train").rglob("*.jpg"))
    sample = [train[i] for i in sorted(np.random.default_rng(0).permutation(len(train))[:128])]
    calibration = lambda: (b.pixels for b in stream_pixels(sample, preprocessing, 16))  # noqa: E731
    pixels = next(iter(stream_pixels(train[:32], preprocessing, 32))).pixels
    with tempfile.TemporaryDirectory() as folder:
        engines = {p: open_engine(backbone, preprocessing, Path(folder), "openvino", p, calibration)
                   for p in ("fp32", "bf16", "int8")}
        for precision, engine in engines.items():
            print(f"{precision}: {convolution_primitives(engine)}", flush=True)
        rates = collections.defaultdict(list)
        for _ in range(args.rounds):
            for precision, engine in engines.items():
                engine(pixels)
                start, done = time.perf_counter(), 0
                while time.perf_counter() - start < args.seconds:
                    engine(pixels)
                    done += len(pixels)
                rates[precision].append(done / (time.perf_counter() - start))
    for precision, values in rates.items():
        print(f"{precision}: {' / '.join(f'{v:.1f}' for v in values)} img/s (forward only, batch {len(pixels)})")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
