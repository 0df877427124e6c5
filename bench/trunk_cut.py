"""Issue 14: where to cut Lite0 for cached-trunk fine-tuning, by measurement.

    .venv/bin/python bench/trunk_cut.py                      # fp32 and bf16-mixed, cuts blocks.4.0 .. blocks.6.0

For a batch of 32 at 224 px: the share of the eval forward spent below each block (what the cache saves), and
one training step (forward + backward, top unfrozen from the cut) on images against the same step on the trunk's
activations (what the cached loop runs). Median of 5 after a warm-up. Prints one JSON line per (precision, cut).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from tlearn.backbones import create_backbone


def median_seconds(step, repeats: int = 5) -> float:
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cuts", default="blocks.4.0,blocks.5.0,blocks.5.1,blocks.6.0")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_backbone("efficientnet_lite0")[0].to(memory_format=torch.channels_last).eval()
    layers = [("conv_stem", model.conv_stem), ("bn1", model.bn1)]
    layers += [(f"blocks.{i}.{j}", block) for i, stage in enumerate(model.blocks) for j, block in enumerate(stage)]
    layers += [("conv_head", model.conv_head), ("bn2", model.bn2), ("global_pool", model.global_pool)]
    head = torch.nn.Linear(1280, 17)
    x = torch.randn(args.batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    def run(h, start, end):
        for _, layer in layers[start:end]:
            h = layer(h)
        return h

    with torch.inference_mode():
        whole = median_seconds(lambda: run(x, 0, len(layers)))
    names = [n for n, _ in layers]
    for precision in ("32-true", "bf16-mixed"):
        for cut_name in args.cuts.split(","):
            cut = names.index(cut_name)
            model.requires_grad_(False)
            for _, layer in layers[cut:]:
                layer.requires_grad_(True)
            with torch.inference_mode():
                below = median_seconds(lambda cut=cut: run(x, 0, cut))
            with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
                with torch.no_grad():
                    acts = run(x, 0, cut)
                full = median_seconds(
                    lambda cut=cut: head(run(run(x, 0, cut), cut, len(layers))).float().sum().backward())
                cached = median_seconds(
                    lambda cut=cut, acts=acts: head(run(acts, cut, len(layers))).float().sum().backward())
            share = round(below / whole, 3)
            print(json.dumps({"precision": precision, "cut": cut_name, "trunk_share_of_forward": share,
                              "full_step_ms": round(full * 1000), "cached_step_ms": round(cached * 1000),
                              "step_speedup": round(full / cached, 2), "activation_shape": list(acts.shape[1:]),
                              "load_average": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
