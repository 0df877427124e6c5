"""Issue 20, an experiment for the head: do pooled features of the last blocks, stacked with the backbone's own,
give a better head, chosen honestly by cross-validation on train?

    HF_HUB_OFFLINE=1 .venv/bin/python bench/stacked_pools.py hymenoptera oxford17flowers

EfficientNet-Lite0, eager torch fp32, the default geometry. For every image of train and of the reported split
(test where there is one, else val): the global average pool of the outputs of blocks 3, 4, 5 and 6 (80, 112, 192
and 320 channels; blocks 5 and 6 sit at the head's 7 x 7) and of the head (1,280: today's features). Each part is
L2-normalised, the earlier ones weighted by w against the head's, concatenated, and the default head is chosen by
5-fold cross-validation on train (tlearn.train.choices: the same folds and grid as `tlearn train`), refit on all of
train and scored on the reported split. The choosing figure is the out-of-fold log loss; the reported split never
chooses. One line per (data, parts, w).
"""
from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

DATASETS = Path(os.environ.get("TLEARN_DATASETS", Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"))
BLOCKS = (3, 4, 5, 6)
COMBOS = {"head": (), "6+head": (6,), "5+6+head": (5, 6), "4+5+6+head": (4, 5, 6)}


def pooled_parts(model, prep, paths: list[Path]) -> dict[str, np.ndarray]:
    import torch
    from PIL import Image

    def pixels(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            image.draft("RGB", prep.draft_size())
            return prep.to_pixels(image.convert("RGB"))

    parts: dict[str, list] = {str(b): [] for b in BLOCKS} | {"head": []}
    with ThreadPoolExecutor(2) as pool, torch.inference_mode():
        for start in range(0, len(paths), 64):
            x = prep.normalise(torch.from_numpy(np.stack(list(pool.map(pixels, paths[start:start + 64])))))
            x = model.bn1(model.conv_stem(x))
            for i, block in enumerate(model.blocks):
                x = block(x)
                if i in BLOCKS:
                    parts[str(i)].append(x.mean((2, 3)).numpy())
            parts["head"].append(model.bn2(model.conv_head(x)).mean((2, 3)).numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def stacked(parts: dict[str, np.ndarray], blocks: tuple[int, ...], w: float) -> np.ndarray:
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # noqa: E731
    return np.concatenate([unit(parts[str(b)]) * w for b in blocks] + [unit(parts["head"])], 1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", nargs="+")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from tlearn.backbones import create_backbone, get_spec
    from tlearn.data import find_dataset
    from tlearn.train.choices import Candidate, choose_head, make_folds, refit

    torch.set_num_threads(2)
    model, _ = create_backbone("efficientnet_lite0")
    prep = get_spec("efficientnet_lite0").preprocessing
    for name in args.data:
        dataset = find_dataset(DATASETS / name, args.seed)
        reported = "test" if "test" in dataset.splits else "val"
        y, y_rep, k = dataset.labels("train"), dataset.labels(reported), len(dataset.classes)
        folds = make_folds(y, dataset.train_groups(), dataset.classes, args.seed)
        train, rep = pooled_parts(model, prep, dataset.paths("train")), pooled_parts(model, prep,
                                                                                     dataset.paths(reported))
        for combo, blocks in COMBOS.items():
            for w in (0.5, 1.0) if blocks else (1.0,):
                candidate = Candidate(combo, stacked(train, blocks, w))
                choice = choose_head(candidate, y, folds, k)
                head = refit(candidate, y, choice, k)
                hits = int((head.logits(stacked(rep, blocks, w)).argmax(1) == y_rep).sum())
                print(json.dumps({"data": name, "parts": combo, "w": w, "C": choice.C,
                                  "cv_log_loss": round(choice.score, 4), "cv_accuracy": round(choice.accuracy, 4),
                                  reported: round(hits / len(y_rep), 4), "hits": f"{hits}/{len(y_rep)}"}),
                      flush=True)


if __name__ == "__main__":
    main()
