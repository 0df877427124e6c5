"""Issue 14, optional: does feature-level test-time augmentation (mean of the image's and its mirror's features)
pay for the default head, and do mirrored training views?

    TLEARN_DATASETS=/work/shared/datasets .venv/bin/python bench/head_tta.py oxford17flowers
    TLEARN_DATASETS=/work/shared/datasets .venv/bin/python bench/head_tta.py hymenoptera
    .venv/bin/python bench/head_tta.py digits

Features come from the frozen Lite0 (eager torch fp32) on the one pixel pipeline's output and on its mirror. The
head (tlearn.train.fit_head, strength chosen on val as `tlearn train` does) is fitted on train's features, or on
train's and their mirrors' (training views); it is scored on val and test on plain features or on the mean of each
image's and its mirror's. One JSON line: val and test accuracy of the four combinations.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from tlearn.backbones import create_backbone, get_spec
from tlearn.data import find_dataset
from tlearn.data.far_sets import make_digits_dataset
from tlearn.engines import stream_pixels
from tlearn.train import balanced_class_weight, fit_head

SHARED = Path(os.environ.get("TLEARN_DATASETS", Path(__file__).resolve().parents[1].parent / "shared" /
                             "datasets"))


@torch.inference_mode()
def features(model, paths, prep, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kept positions, features of the image, features of its mirror)."""
    kept, plain, mirrored = [], [], []
    for batch in stream_pixels(paths, prep, batch_size):
        if not batch.indices:
            continue
        x = prep.normalise(torch.from_numpy(batch.pixels))
        kept.extend(batch.indices)
        plain.append(model(x).numpy())
        mirrored.append(model(x.flip(-1)).numpy())
    return np.array(kept), np.concatenate(plain), np.concatenate(mirrored)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_digits_dataset(Path(tmp) / "d") if args.dataset == "digits" else SHARED / args.dataset
        dataset = find_dataset(data, 0, 0.15, 0.15)
        prep = get_spec("efficientnet_lite0").preprocessing
        model = create_backbone("efficientnet_lite0")[0].to(memory_format=torch.channels_last)
        feats = {s: features(model, dataset.paths(s), prep) for s in dataset.splits}
    ys = {s: dataset.labels(s)[f[0]] for s, f in feats.items()}
    k = len(dataset.classes)
    heads = {"plain": (feats["train"][1], ys["train"]),
             "train_views": (np.concatenate(feats["train"][1:]), np.concatenate([ys["train"]] * 2))}
    out = {"dataset": args.dataset}
    for name, (x, y) in heads.items():
        head = fit_head(x, y, feats["val"][1], ys["val"], k, class_weight=balanced_class_weight(y, k)).head
        for tta in (False, True):
            for split in (s for s in ("val", "test") if s in feats):
                _, plain, mirrored = feats[split]
                logits = head.logits((plain + mirrored) / 2 if tta else plain)
                out[f"{name}{'+tta' if tta else ''}_{split}"] = float((logits.argmax(1) == ys[split]).mean())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
