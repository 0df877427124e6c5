"""Issue 20, the experiment behind `--imagenet-prior`: the backbone's own ImageNet class probabilities beside its
pooled features, as inputs of the head, chosen honestly by cross-validation on train?

    HF_HUB_OFFLINE=1 .venv/bin/python bench/imagenet_prior.py hymenoptera oxford17flowers
    TLEARN_DATASETS=/work/bench-data HF_HUB_OFFLINE=1 .venv/bin/python bench/imagenet_prior.py pbc8

EfficientNet-Lite0, eager torch fp32, the default geometry. For every image of train and of the reported split (test
where there is one, else val): the pooled features and the ImageNet classifier's 1,000 logits of the same forward
pass. Three encodings of the probabilities p (raw p, sqrt(p), centred log p), each L2-normalised and weighted w
against the L2-normalised features, concatenated; the default head chosen by 5-fold cross-validation on train
(tlearn.train.choices: the same folds and grid as `tlearn train`), refit on all of train, scored on the reported
split. The choosing figure is the out-of-fold log loss; the reported split never chooses. One JSON line per (data,
fold seed, encoding, w); `--seeds` repeats the folds with other seeds. Features are kept in --keep (npz) between
runs.
"""
from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

DATASETS = Path(os.environ.get("TLEARN_DATASETS", Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"))


def features_and_logits(model, prep, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from PIL import Image

    def pixels(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            image.draft("RGB", prep.draft_size())
            return prep.to_pixels(image.convert("RGB"))

    features, logits = [], []
    with ThreadPoolExecutor(2) as pool, torch.inference_mode():
        for start in range(0, len(paths), 64):
            x = prep.normalise(torch.from_numpy(np.stack(list(pool.map(pixels, paths[start:start + 64])))))
            pooled = model.forward_head(model.forward_features(x), pre_logits=True)
            features.append(pooled.numpy())
            logits.append(model.classifier(pooled).numpy())
    return np.concatenate(features), np.concatenate(logits)


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def encoded(features: np.ndarray, logits: np.ndarray, encoding: str, w: float) -> np.ndarray:
    from scipy.special import log_softmax, softmax

    if encoding == "none":
        return features
    p, logp = softmax(logits, 1), log_softmax(logits, 1)
    block = {"prob": p, "sqrt": np.sqrt(p), "log": logp - logp.mean(1, keepdims=True)}[encoding]
    return np.concatenate([unit(features), w * unit(block)], 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--encodings", nargs="+", default=["prob", "sqrt", "log"])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--keep", type=Path, default=Path("/tmp/tlearn-imagenet-prior"))
    args = parser.parse_args()

    import torch

    from tlearn.backbones import create_backbone, get_spec
    from tlearn.data import find_dataset
    from tlearn.train.choices import Candidate, choose_head, make_folds, refit

    torch.set_num_threads(2)
    model, _ = create_backbone("efficientnet_lite0", imagenet_head=True)
    prep = get_spec("efficientnet_lite0").preprocessing
    args.keep.mkdir(parents=True, exist_ok=True)
    for name in args.data:
        dataset = find_dataset(DATASETS / name, 0)
        reported = "test" if "test" in dataset.splits else "val"
        y, y_rep, k = dataset.labels("train"), dataset.labels(reported), len(dataset.classes)
        kept = args.keep / f"{name}.npz"
        if kept.is_file():
            with np.load(kept) as data:
                ft, lt, fr, lr = data["ft"], data["lt"], data["fr"], data["lr"]
        else:
            ft, lt = features_and_logits(model, prep, dataset.paths("train"))
            fr, lr = features_and_logits(model, prep, dataset.paths(reported))
            np.savez(kept, ft=ft, lt=lt, fr=fr, lr=lr)
        variants = [("none", 0.0)] + [(e, w) for e in args.encodings for w in args.weights]
        for seed in args.seeds:
            folds = make_folds(y, dataset.train_groups(), dataset.classes, seed)
            for encoding, w in variants:
                candidate = Candidate(f"{encoding}-{w}", encoded(ft, lt, encoding, w))
                choice = choose_head(candidate, y, folds, k)
                head = refit(candidate, y, choice, k)
                hits = int((head.logits(encoded(fr, lr, encoding, w)).argmax(1) == y_rep).sum())
                print(json.dumps({"data": name, "fold_seed": seed, "encoding": encoding, "w": w, "C": choice.C,
                                  "cv_log_loss": round(choice.score, 4), "cv_accuracy": round(choice.accuracy, 4),
                                  reported: f"{hits}/{len(y_rep)}"}), flush=True)


if __name__ == "__main__":
    main()
