"""Find a labelled image dataset on disk and the split it is used with.

Layouts: ROOT/{train,val|validation|valid,test}/<class>/..., ROOT/{train,test}/<class>/... (val carved out of
train when asked), and ROOT/train/<class>/... alone or ROOT/<class>/... (test, and val when asked, carved out). A
folder named like a split is a split only when it holds class folders; folder names keep their case. Carved splits
are stratified and stable (see splits.py); files that cannot be decoded are skipped, never counted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlearn.data.decode import is_image_path
from tlearn.data.discovery import Scan, Skipped, sub_folders, walk_images
from tlearn.data.fingerprints import Fingerprint, fingerprint_files
from tlearn.data.splits import Leak, carve, find_leaks, near_groups
from tlearn.errors import DatasetError

SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "validation", "valid"), "test": ("test", "testing")}
SPLIT_OF = {name: split for split, names in SPLIT_FOLDERS.items() for name in names}




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
    skipped: list[Skipped] = field(default_factory=list)  # images, links and folders that cannot be used, and why
    leaks: list[Leak] = field(default_factory=list)  # exact or near-duplicates in different splits
    hashes: dict[Path, str] = field(default_factory=dict)  # content hash of every sample
    groups: dict[Path, int] = field(default_factory=dict)  # near-duplicate group of each train sample

    def train_groups(self) -> np.ndarray:
        """The near-duplicate group of each train sample, in order (a sample alone is a group of its own): folds
        of cross-validation keep a group together."""
        samples = self.split("train")
        return np.array([self.groups.get(s.path, -1 - i) for i, s in enumerate(samples)], dtype=np.int64)

    def paths(self, split: str) -> list[Path]:
        return [s.path for s in self.split(split)]

    def labels(self, split: str) -> np.ndarray:
        return np.array([s.label for s in self.split(split)], dtype=np.int64)

    def split(self, name: str) -> list[Sample]:
        if name not in self.splits:
            raise DatasetError(f"{self.root} has no {name!r} split (it has: {', '.join(self.splits)})")
        return self.splits[name]

    def describe_leaks(self, examples: int = 10) -> dict:
        """The leak count and the first `examples` pairs (relative paths): for a warning and for metrics.json."""
        return {"count": len(self.leaks),
                "examples": [{"paths": [os.path.relpath(p, self.root) for p in leak.paths],
                              "splits": list(leak.splits), "bits": leak.bits} for leak in self.leaks[:examples]]}

    def describe(self) -> dict:
        """The split actually used, as relative paths: saved with the model so it can be reproduced; and the content
        of the training images (see `trained_content`), so an evaluation elsewhere can leave them out."""
        return {"layout": self.layout, "classes": self.classes,
                "files": {name: [[str(s.path.relative_to(self.root)), s.label] for s in samples]
                          for name, samples in self.splits.items()},
                "train_content": [trained_content(self.hashes[s.path]) for s in self.splits.get("train", [])
                                  if self.hashes.get(s.path)]}


def trained_content(content_hash: str) -> str:
    """What a model folder keeps of a training image's SHA-256: its first 16 hex digits (64 bits: no two of a
    dataset's images share them by chance), enough to know an image again under any name or folder."""
    return content_hash[:16]


def find_dataset(root: str | Path, seed: int = 0, val_fraction: float = 0.0, test_fraction: float = 0.15, *,
                 cache_dir: str | Path | None = None, workers: int = 2,
                 relabel: str | Path | None = None, evaluation_only: bool = False) -> Dataset:
    """Find the dataset under `root`, carving missing val/test splits (stratified, stable); raise DatasetError.

    Every image is fingerprinted (content and perceptual hash, cached in `cache_dir`): undecodable files are
    skipped, near-duplicates are kept in one carved split, and those across given splits are listed as leaks.
    `relabel`: a relabel CSV (path,label; tlearn.data.relabel) whose labels replace the folders', no file moved.
    `evaluation_only`: the data is only scored, so val/ and test/ folders without a train/ one are a dataset too
    (nothing is carved from them).
    """
    root = Path(root).expanduser()
    _check_root(root)
    _check_fractions(val_fraction, test_fraction)
    scan = Scan()
    folders = sub_folders(root, scan)
    split_folders = _split_folders(root, folders, need_train=not evaluation_only)
    if split_folders:
        per_split = {split: _scan_classes(sub_folders(folder, scan), root, scan)
                     for split, folder in split_folders.items()}
        scan.skipped += [Skipped(f, "not a split folder (train, val, test): not used") for f in folders
                         if f not in split_folders.values()]
    else:
        per_split = {"": _scan_classes(folders, root, scan)}
    if relabel is not None:
        _apply_relabels(per_split, root, relabel)
    prints = fingerprint_files(scan.images, Path(cache_dir) if cache_dir else None, workers)
    per_split = {split: _usable(by_class, prints, scan) for split, by_class in per_split.items()}
    train_key = ("train" if "train" in per_split else next(iter(per_split))) if split_folders else ""
    classes = sorted(per_split[train_key])
    _check_classes(root, classes, per_split, split_folders, train_key)
    per_split, layout = _carve_missing(per_split, split_folders, prints, seed, val_fraction, test_fraction)
    index = {name: i for i, name in enumerate(classes)}
    splits = {split: [Sample(p, index[c]) for c in classes for p in per_split[split].get(c, [])]
              for split in SPLIT_FOLDERS if split in per_split}
    leaks = find_leaks({split: [s.path for s in samples] for split, samples in splits.items()}, prints)
    hashes = {s.path: prints[s.path].sha256 for samples in splits.values() for s in samples}
    train = per_split.get("train", {})  # none when only val/ and test/ are scored (evaluation_only)
    groups = {path: i for i, group in enumerate(g for c in classes for g in near_groups(train.get(c, []), prints))
              for path in group}
    return Dataset(root, classes, splits, layout, scan.ignored, scan.skipped, leaks, hashes, groups)


def _apply_relabels(per_split: dict[str, dict[str, list[Path]]], root: Path, file: str | Path) -> None:
    """Each image a relabel file names moves, in the lists only, to the class it names (checked first, by line)."""
    from tlearn.data.relabel import check_labels, read_relabel_file

    relabels = read_relabel_file(file, root)
    classes = sorted(per_split["train" if "train" in per_split else ""])
    check_labels(relabels, classes, file)
    wanted = {r.path: r for r in relabels}  # absolute, links kept: as the scan lists the files
    placed = set()
    for by_class in per_split.values():
        for name in list(by_class):
            kept = []
            for path in by_class[name]:
                r = wanted.get(Path(os.path.abspath(path)))
                if r is not None:
                    placed.add(r.path)
                if r is None or r.label == name:
                    kept.append(path)
                else:
                    by_class.setdefault(r.label, []).append(path)
            by_class[name] = kept
        for name in by_class:
            by_class[name].sort()
    unused = [r for p, r in wanted.items() if p not in placed]
    if unused:
        raise DatasetError(f"{file} line {unused[0].line}: {unused[0].path} is not an image of the dataset (not in "
                           "a class folder, or not an image tlearn reads)")


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root} is a file; give the folder that holds one sub-folder per class "
                           "(or train/ val/ test/ folders)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise DatasetError(f"cannot read the dataset folder {root} (permission denied)")


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise DatasetError(f"{name} must be at least 0 and below 1, not {value}")
    if val_fraction + test_fraction >= 1.0:
        raise DatasetError(f"val_fraction + test_fraction must leave images to train on, not "
                           f"{val_fraction} + {test_fraction}")


def _split_folders(root: Path, folders: list[Path], need_train: bool = True) -> dict[str, Path]:
    """split -> folder when the top folders are splits holding class folders; {} for one folder per class.
    `need_train`: a DatasetError when none of them is train/."""
    named: dict[str, list[Path]] = {}
    for folder in folders:
        if folder.name.lower() in SPLIT_OF:
            named.setdefault(SPLIT_OF[folder.name.lower()], []).append(folder)
    holding_classes = {split: [f for f in found if _holds_class_folders(f)] for split, found in named.items()}
    if not any(holding_classes.values()):
        return {}  # classes that happen to be named like splits (e.g. valid/ and invalid/)
    if not holding_classes.get("train") and need_train:
        listed = ", ".join(f"{f.name}/" for found in named.values() for f in found)
        raise DatasetError(f"{root} has {listed} but no train/ folder of class folders")
    for split, found in named.items():
        if len(found) > 1:
            raise DatasetError(f"{root} has {' and '.join(f'{f.name}/' for f in found)}, all for the {split} "
                               "split: keep one (folder names are case-sensitive)")
        if not holding_classes[split]:
            raise DatasetError(f"{found[0]} holds images directly, but {holding_classes['train'][0].name}/ holds "
                               f"class folders: put {found[0].name}/'s images in one sub-folder per class")
    return {split: named[split][0] for split in SPLIT_FOLDERS if split in named}


def _holds_class_folders(folder: Path) -> bool:
    """A split folder holds sub-folders and no images of its own; a class folder holds images."""
    scan = Scan()
    inside = sub_folders(folder, scan)
    return bool(inside) and not any(is_image_path(p) for p in scan.ignored)


def _scan_classes(class_dirs: list[Path], root: Path, scan: Scan) -> dict[str, list[Path]]:
    """Class name (the folder name, case kept) -> sorted image files under it."""
    classes = {}
    for class_dir in class_dirs:
        found = walk_images(class_dir, stop_at=root)
        scan.extend(found)
        classes[class_dir.name] = found.images
    return classes


def _usable(by_class: dict[str, list[Path]], prints: dict[Path, Fingerprint], scan: Scan) -> dict[str, list[Path]]:
    """The images that decode; the others are skipped with their reason, never counted."""
    scan.skipped += [Skipped(p, prints[p].problem or "cannot be decoded", "unreadable") for files in by_class.values()
                     for p in files if not prints[p].usable]
    return {name: [p for p in files if prints[p].usable] for name, files in by_class.items()}


def _check_classes(root: Path, classes: list[str], per_split: dict[str, dict[str, list[Path]]],
                   split_folders: dict[str, Path], train_key: str) -> None:
    """`train_key`: the split whose classes are `classes` ("" for one folder per class)."""
    where = lambda split: str(split_folders[split]) if split else str(root)  # noqa: E731
    first = train_key or "train"  # the split the others are held to (train, unless only val/test are scored)
    if not classes:
        raise DatasetError(f"no class folders in {where(train_key)}: expected one sub-folder of images per class")
    if len(classes) < 2:
        raise DatasetError(f"only one class ({classes[0]!r}) in {where(train_key)}: a classifier needs at least two "
                           "class folders")
    for split, by_class in per_split.items():
        for name, files in by_class.items():
            if not files:
                raise DatasetError(f"class {name!r} in {where(split)} has no images tlearn can use (extensions: "
                                   "jpg, jpeg, png, bmp, gif, webp, tif, tiff; see the skipped files)")
        missing = sorted(set(classes) - set(by_class))
        extra = sorted(set(by_class) - set(classes))
        if extra:
            raise DatasetError(f"{where(split)} has classes that {first} does not: {', '.join(extra)}")
        if missing:
            raise DatasetError(f"{where(split)} is missing classes that {first} has: {', '.join(missing)}; add a "
                               f"folder with images for each, or remove the class from {first}")


def _carve_missing(per_split: dict[str, dict[str, list[Path]]], split_folders: dict[str, Path],
                   prints: dict[Path, Fingerprint], seed: int, val_fraction: float, test_fraction: float
                   ) -> tuple[dict[str, dict[str, list[Path]]], str]:
    """The splits with val (and test, for one folder per class or a train/ folder alone) carved out, and the
    layout in words."""
    rule = f"stratified, by content hash, near-duplicates together, seed {seed}"
    layout = "folders " + "/".join(f.name for f in split_folders.values()) if split_folders else \
        "one folder per class"
    alone = per_split.get("train") if set(per_split) == {"train"} else per_split.get("")
    if alone is not None:  # nothing given to report on: test, and val when asked, carved out of it
        fractions = {name: f for name, f in (("test", test_fraction), ("val", val_fraction)) if f > 0}
        if not fractions:
            return {"train": alone}, f"{layout}; all of it train (nothing carved to report on)"
        carved = carve(alone, prints, fractions, seed, str(split_folders["train"]) if split_folders else
                       "the dataset")
        shares = "/".join(f"{f:.0%}" for f in (1 - val_fraction - test_fraction, *fractions.values()))
        return carved, (f"{layout}; {'/'.join(('train', *fractions))} carved {shares}"
                        f"{' from train' if split_folders else ''} ({rule})")
    if "train" not in per_split:  # val/ and test/ to be scored (evaluation_only): nothing to carve from
        return per_split, f"{layout} (no train/: scored only)"
    if "val" in per_split or val_fraction == 0:
        return per_split, layout
    carved = carve(per_split["train"], prints, {"val": val_fraction}, seed, str(split_folders["train"]))
    return {**per_split, **carved}, f"{layout}; val carved from train ({val_fraction:.0%}, {rule})"
