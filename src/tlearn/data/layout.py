"""Find a labelled image dataset on disk and the split it is used with.

Layouts: ROOT/{train,val|validation|valid,test}/<class>/..., ROOT/{train,test}/<class>/... (val carved out of
train), and ROOT/<class>/... (train/val/test carved out). Carved splits are stratified and seeded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.data.decode import is_image_path
from tlearn.errors import DatasetError

SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "validation", "valid"), "test": ("test", "testing")}




@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class Dataset:
    """A dataset found on disk: class names (sorted folder names) and the samples of each split."""

    root: Path
    classes: list[str]
    splits: dict[str, list[Sample]]
    layout: str  # how the splits were obtained, in words
    ignored: list[Path] = field(default_factory=list)  # files without an image extension

    def paths(self, split: str) -> list[Path]:
        return [s.path for s in self.split(split)]

    def labels(self, split: str) -> np.ndarray:
        return np.array([s.label for s in self.split(split)], dtype=np.int64)

    def split(self, name: str) -> list[Sample]:
        if name not in self.splits:
            raise DatasetError(f"{self.root} has no {name!r} split (it has: {', '.join(self.splits)})")
        return self.splits[name]

    def describe(self) -> dict:
        """The split actually used, as relative paths: saved with the model so it can be reproduced."""
        return {"layout": self.layout, "classes": self.classes,
                "files": {name: [[str(s.path.relative_to(self.root)), s.label] for s in samples]
                          for name, samples in self.splits.items()}}


def find_dataset(root: str | Path, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15) -> Dataset:
    """Find the dataset under `root`, carving missing val/test splits (stratified, seeded); raise DatasetError."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root} is a file; give the folder that holds one sub-folder per class "
                           "(or train/ val/ test/ folders)")
    folders = {p.name.lower(): p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    found = {split: folders[name] for split, names in SPLIT_FOLDERS.items() for name in names if name in folders}
    ignored: list[Path] = []
    rng = np.random.default_rng(seed)
    if found:
        if "train" not in found:
            raise DatasetError(f"{root} has {', '.join(p.name for p in found.values())}/ but no train/ folder")
        per_split = {split: _scan_classes(folder, ignored) for split, folder in found.items()}
        classes = sorted(per_split["train"])
        _check_classes(root, classes, per_split)
        layout = "folders " + "/".join(p.name for p in found.values())
        if "val" not in per_split:
            per_split["train"], per_split["val"] = _carve(per_split["train"], val_fraction, rng, "val", "train")
            layout += f"; val carved from train ({val_fraction:.0%}, stratified, seed {seed})"
    else:
        everything = _scan_classes(root, ignored)
        classes = sorted(everything)
        _check_classes(root, classes, {"": everything})
        rest, test = _carve(everything, test_fraction, rng, "test", "the dataset")
        train, val = _carve(rest, val_fraction / (1 - test_fraction), rng, "val", "the dataset")
        per_split = {"train": train, "val": val, "test": test}
        layout = (f"one folder per class; train/val/test carved {1 - val_fraction - test_fraction:.0%}/"
                  f"{val_fraction:.0%}/{test_fraction:.0%} (stratified, seed {seed})")
    index = {name: i for i, name in enumerate(classes)}
    splits = {split: [Sample(p, index[c]) for c in classes for p in per_split[split].get(c, [])]
              for split in ("train", "val", "test") if split in per_split}
    return Dataset(root, classes, splits, layout, ignored)


def _scan_classes(folder: Path, ignored: list[Path]) -> dict[str, list[Path]]:
    """Class name -> sorted image files (recursively) for each sub-folder of `folder`."""
    classes = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in class_dir.rglob("*") if p.is_file())
        classes[class_dir.name] = [p for p in files if is_image_path(p)]
        ignored.extend(p for p in files if not is_image_path(p) and not p.name.startswith("."))
    return classes


def _check_classes(root: Path, classes: list[str], per_split: dict[str, dict[str, list[Path]]]) -> None:
    where = lambda split: f"{root}/{split}" if split else str(root)  # noqa: E731
    train_key = "train" if "train" in per_split else ""
    if not classes:
        raise DatasetError(f"no class folders in {where(train_key)}: expected one sub-folder of images per class")
    if len(classes) < 2:
        raise DatasetError(f"only one class ({classes[0]!r}) in {where(train_key)}: a classifier needs at least two "
                           "class folders")
    for split, by_class in per_split.items():
        for name, files in by_class.items():
            if not files:
                raise DatasetError(f"class {name!r} in {where(split)} has no images (readable extensions: jpg, "
                                   "jpeg, png, bmp, gif, webp, tif, tiff)")
        missing = sorted(set(classes) - set(by_class))
        extra = sorted(set(by_class) - set(classes))
        if extra:
            raise DatasetError(f"{where(split)} has classes that train does not: {', '.join(extra)}")
        if missing:
            raise DatasetError(f"{where(split)} is missing classes that train has: {', '.join(missing)}; add a "
                               "folder with images for each, or remove the class from train")


def _carve(by_class: dict[str, list[Path]], fraction: float, rng: np.random.Generator, name: str,
           source: str) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Move a seeded, stratified `fraction` of each class out of `by_class` (at least one image per class)."""
    kept, carved = {}, {}
    for cls in sorted(by_class):
        files = by_class[cls]
        if len(files) < 2:
            raise DatasetError(f"class {cls!r} has only {len(files)} image in {source}: at least 2 are needed to "
                               f"carve a {name} split; add images or provide a {name}/ folder")
        order = rng.permutation(len(files))
        n = min(len(files) - 1, max(1, round(fraction * len(files))))
        carved[cls] = sorted(files[i] for i in order[:n])
        kept[cls] = sorted(files[i] for i in order[n:])
    return kept, carved
