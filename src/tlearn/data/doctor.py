"""Check a dataset before trusting it: unreadable or odd files, duplicates, leakage between splits, balance.

Every file is decoded with `load_image`'s decoder (the one training uses); perceptual hashes are the cached
fingerprints the carved splits are made with (fingerprints.py), so the doctor and the splits agree.
`quick_check` runs only the checks that need no decoding (structure, counts, exact duplicates by content hash),
cheap enough to run before every training.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import Progress

from tlearn.data.decode import DecodeError, content_hashes, decode_bytes, read_regular_file
from tlearn.data.discovery import walk_images
from tlearn.data.fingerprints import NEAR_DUPLICATE_BITS, fingerprint_files, near_pairs
from tlearn.data.layout import SPLIT_OF, Dataset, DatasetError, find_dataset
from tlearn.data.splits import K_FOLDS
from tlearn.files import disk_refusals
from tlearn.outputs import csv_cell, csv_writer

ERROR, WARNING = "error", "warning"
TINY_SIDE = 48  # pixels; below this the backbone sees mostly upsampling blur
PLACEHOLDER_SHARE = 0.6  # share of one flat colour above which an image looks like a placeholder or a blank
PLACEHOLDER_COLOURS = 256  # ... when it also has this few distinct colours (photos have thousands)
ODD_MODES = {"CMYK": "CMYK", "P": "palette", "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit",
             "I": "32-bit integer", "F": "32-bit float", "1": "1-bit", "LAB": "Lab", "HSV": "HSV"}
EXTENSIONS = {"JPEG": {".jpg", ".jpeg"}, "MPO": {".jpg", ".jpeg"}, "PNG": {".png"}, "GIF": {".gif"},
              "BMP": {".bmp"}, "WEBP": {".webp"}, "TIFF": {".tif", ".tiff"}}


@dataclass
class Finding:
    """One problem: what kind, how bad, in words, the files involved and those `quarantine` would move."""

    kind: str
    severity: str  # ERROR corrupts an evaluation (leakage, conflicting labels, unusable layout); else WARNING
    message: str
    paths: list[str] = field(default_factory=list)  # relative to the dataset root
    move: list[str] = field(default_factory=list)


@dataclass
class DoctorReport:
    root: str
    layout: str | None
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> images
    findings: list[Finding]
    files_checked: int
    decoded: bool  # False for quick_check (no per-image checks, exact duplicates only)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def imbalance(self) -> dict[str, float]:
        """Largest over smallest class count, per split."""
        return {split: max(c.values()) / max(1, min(c.values())) for split, c in self.counts.items() if c}

    def _repr_html_(self) -> str:
        from tlearn.notebook import doctor_html

        return doctor_html(self)

    def to_dict(self) -> dict:
        return {"root": self.root, "layout": self.layout, "classes": self.classes, "counts": self.counts,
                "imbalance": self.imbalance, "files_checked": self.files_checked, "decoded": self.decoded,
                "errors": len(self.errors), "warnings": len(self.warnings),
                "findings": [asdict(f) for f in self.findings]}


@dataclass
class _File:
    path: Path
    split: str
    label: str
    sha256: str | None = None
    phash: int | None = None


def examine_dataset(root: str | Path, seed: int = 0, val_fraction: float = 0.0, test_fraction: float = 0.15,
                    progress: bool = True, workers: int = 4, cache_dir: str | Path | None = None) -> DoctorReport:
    """Decode every image and run all checks; structural problems become findings, not exceptions."""
    files, layout, findings = _collect(Path(root).expanduser(), seed, val_fraction, test_fraction, cache_dir)
    prints = fingerprint_files([f.path for f in files], Path(cache_dir) if cache_dir else None)
    for f in files:
        f.phash = prints[f.path].phash
    with Progress(disable=not progress, transient=True, console=Console(stderr=True)) as bar, \
            ThreadPoolExecutor(workers) as pool:
        task = bar.add_task("checking images", total=len(files))
        for problems in pool.map(_inspect, files):
            findings.extend(problems)
            bar.advance(task)
    findings += _duplicate_findings(files, lambda f: f.sha256, "exact")
    findings += _near_duplicate_findings(files)
    return _report(Path(root).expanduser(), layout, files, findings, decoded=True)


def quick_check(dataset: Dataset, hashes: dict[Path, str | None] | None = None) -> DoctorReport:
    """The checks that need no decoding: class counts and exact duplicates (content hash) across splits/classes.

    `hashes` (path -> content hash, see content_hashes) saves reading the files again when the caller has them."""
    files = [_File(s.path, split, dataset.classes[s.label]) for split, samples in dataset.splits.items()
             for s in samples]
    hashes = hashes if hashes is not None else content_hashes([f.path for f in files])
    for f in files:
        f.sha256 = hashes[f.path]
    findings = _duplicate_findings(files, lambda f: f.sha256, "exact")
    return _report(dataset.root, dataset.layout, files, findings, decoded=False)


def quarantine(report: DoctorReport, directory: str | Path) -> list[dict]:
    """MOVE the files the findings flag into `directory` (same relative paths) and append reasons.csv there."""
    root, directory = Path(report.root).resolve(), Path(directory).expanduser().resolve()
    if directory == root or root in directory.parents:
        raise DatasetError(f"the quarantine folder {directory} is inside the dataset {root}: choose one outside it, "
                         "or its files would be read as a class")
    if directory.exists() and not directory.is_dir():
        raise DatasetError(f"--quarantine {directory} is a file, not a folder: give a folder (it is made if absent)")
    reasons: dict[str, list[str]] = defaultdict(list)
    for finding in report.findings:
        for rel in finding.move:
            reasons[rel].append(f"{finding.kind}: {finding.message}")
    moved = []
    with disk_refusals(directory, "--quarantine"):  # a full or read-only disk: one line; what moved is logged
        try:
            for rel, why in sorted(reasons.items()):
                source = root / rel
                if not source.exists():
                    continue
                target = _free_name(directory / rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(source, target)
                moved.append({"path": rel, "moved_to": str(target), "reasons": " | ".join(why)})
        finally:
            if moved:
                _append_reasons(directory / "reasons.csv", moved)
    return moved


def _append_reasons(log: Path, moved: list[dict]) -> None:
    """Append to reasons.csv: UTF-8, a name that is not keeps its bytes, cells neutralised (see tlearn.outputs)."""
    new = not log.exists()
    with open(log, "a", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv_writer(handle)
        if new:
            writer.writerow(["path", "moved_to", "reasons"])
        writer.writerows([csv_cell(row[key]) for key in ("path", "moved_to", "reasons")] for row in moved)


# ---- finding the files --------------------------------------------------------------------------------------
def _collect(root: Path, seed: int, val_fraction: float, test_fraction: float, cache_dir: str | Path | None
             ) -> tuple[list[_File], str | None, list[Finding]]:
    try:
        dataset = find_dataset(root, seed, val_fraction, test_fraction, cache_dir=cache_dir)
    except DatasetError as exc:
        if not root.is_dir():
            raise
        # Keep going on what is there: the structural problem is reported, the files are still checked.
        files = _scan_leniently(root)
        return files, None, [Finding("structure", ERROR, f"{exc}")] + _missing_classes(files)
    files = [_File(s.path, split, dataset.classes[s.label]) for split, samples in dataset.splits.items()
             for s in samples]
    return files, dataset.layout, [_skipped_finding(s.path, s.reason, s.kind) for s in dataset.skipped]


def _skipped_finding(path: Path, reason: str, kind: str) -> Finding:
    """An image that does not decode is quarantined; a link, folder or special file is only named."""
    rel = str(path)
    return Finding(kind, WARNING, reason, [rel], [rel] if kind == "unreadable" else [])


def _scan_leniently(root: Path) -> list[_File]:
    """Every image under root, labelled split/class from its folders (split 'all' without split folders)."""
    files = []
    for path in walk_images(root).images:
        parts = path.relative_to(root).parts
        if parts[0].lower() in SPLIT_OF and len(parts) >= 3:
            files.append(_File(path, SPLIT_OF[parts[0].lower()], parts[1]))
        elif len(parts) >= 2:
            files.append(_File(path, "all", parts[0]))
    return files


def _missing_classes(files: list[_File]) -> list[Finding]:
    by_split: dict[str, set[str]] = defaultdict(set)
    for f in files:
        by_split[f.split].add(f.label)
    every = set().union(*by_split.values()) if by_split else set()
    return [Finding("missing_class", ERROR, f"split {split!r} has no images of class(es) "
                                          f"{', '.join(sorted(every - present))}")
            for split, present in sorted(by_split.items()) if every - present]


# ---- one file at a time -------------------------------------------------------------------------------------
def _inspect(f: _File) -> list[Finding]:
    """Decode one file (filling in its hashes) and return its own problems."""
    rel = str(f.path)
    try:
        content = read_regular_file(f.path)
        f.sha256 = hashlib.sha256(content).hexdigest()
        image = decode_bytes(content, f.path)
    except DecodeError as exc:
        return [Finding("unreadable", WARNING, exc.reason, [rel], [rel])]
    header = Image.open(io.BytesIO(content))
    return [Finding(kind, WARNING, message, [rel], [rel] if quarantined else [])
            for kind, message, quarantined in _file_problems(f.path, header, image)]


def _file_problems(path: Path, header: Image.Image, image: Image.Image) -> list[tuple[str, str, bool]]:
    """(kind, message, should be quarantined) for the problems of one decoded image."""
    problems = []
    allowed = EXTENSIONS.get(header.format or "", set())
    if allowed and path.suffix.lower() not in allowed:
        problems.append(("extension_mismatch", f"content is {header.format} but the extension is {path.suffix}",
                         False))
    frames = getattr(header, "n_frames", 1)
    if frames > 1:
        problems.append(("animated", f"animated ({frames} frames); only the first is used", False))
    flat, few_colours = _flat_share(image), image.getcolors(PLACEHOLDER_COLOURS) is not None
    if flat >= PLACEHOLDER_SHARE and few_colours:
        what = "GIF, " if header.format == "GIF" else ""
        problems.append(("suspicious", f"looks like a placeholder or blank ({what}{flat:.0%} of it is one flat "
                                       f"colour, at most {PLACEHOLDER_COLOURS} colours)", True))
    elif flat >= PLACEHOLDER_SHARE:
        problems.append(("suspicious", f"{flat:.0%} of it is one flat colour: a cut-out, drawing or scan rather "
                                       "than a photo?", False))
    elif header.format == "GIF":
        problems.append(("suspicious", "GIF: often a placeholder, icon or animation rather than a photo", False))
    if min(image.size) < TINY_SIDE:
        problems.append(("tiny", f"tiny image ({image.width}x{image.height})", False))
    if header.mode in ODD_MODES:
        problems.append(("odd_mode", f"{ODD_MODES[header.mode]} image (mode {header.mode}); converted to RGB", False))
    return problems


def _flat_share(image: Image.Image) -> float:
    """Share of the most common exact colour in a 64x64 sample of the pixels (photos stay well below half)."""
    small = np.asarray(image.resize((64, 64), Image.Resampling.NEAREST), dtype=np.int64)
    codes = (small[..., 0] << 16) | (small[..., 1] << 8) | small[..., 2]
    return float(np.unique(codes, return_counts=True)[1].max() / codes.size)


# ---- across files -------------------------------------------------------------------------------------------
def _duplicate_findings(files: list[_File], key, what: str) -> list[Finding]:
    groups: dict[object, list[_File]] = defaultdict(list)
    for f in files:
        if key(f) is not None:
            groups[key(f)].append(f)
    return [finding for group in groups.values() if len(group) > 1 for finding in _classify_group(group, what)]


def _near_duplicate_findings(files: list[_File]) -> list[Finding]:
    """Pairs of different files whose perceptual hashes differ in at most NEAR_DUPLICATE_BITS bits."""
    hashed = [f for f in files if f.phash is not None]
    findings = []
    for i, j, _ in near_pairs([f.phash for f in hashed], NEAR_DUPLICATE_BITS):
        if hashed[i].sha256 != hashed[j].sha256:
            findings += _classify_group([hashed[i], hashed[j]], "near")
    return findings


def _classify_group(group: list[_File], what: str) -> list[Finding]:
    """Findings for files with the same content (what='exact') or nearly the same picture (what='near')."""
    paths = [str(f.path) for f in group]
    findings = []
    noun = "identical files" if what == "exact" else "near-duplicate images (perceptual hash)"
    labels, splits = {f.label for f in group}, {f.split for f in group}
    if len(labels) > 1:
        findings.append(Finding("conflicting_labels", ERROR, f"{noun} labelled {' and '.join(sorted(labels))}",
                                paths, paths))
    if len(splits) > 1:
        # keep the training copy, quarantine the ones in the splits that measure the model
        evaluated = [str(f.path) for f in group if f.split != "train"] if "train" in splits else paths[1:]
        findings.append(Finding("leakage", ERROR, f"{noun} in splits {' and '.join(sorted(splits))}: the model "
                                                  "is evaluated on images it was trained on", paths, evaluated))
    if len(labels) == 1 and len(splits) == 1:
        findings.append(Finding(f"{what}_duplicate", WARNING, f"{noun} in {group[0].split}/{group[0].label}",
                                paths, paths[1:] if what == "exact" else []))
    return findings


def _report(root: Path, layout: str | None, files: list[_File], findings: list[Finding],
            decoded: bool) -> DoctorReport:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for f in files:
        counts[f.split][f.label] += 1
    classes = sorted({f.label for f in files})
    findings = findings + _few_images_findings(counts.get("train", {}), classes)
    for finding in findings:
        finding.paths = [_relative(p, root) for p in finding.paths]
        finding.move = [_relative(p, root) for p in finding.move]
    order = {ERROR: 0, WARNING: 1}
    findings.sort(key=lambda f: (order[f.severity], f.kind, f.paths))
    return DoctorReport(str(root), layout, classes, {s: dict(sorted(c.items())) for s, c in counts.items()},
                        findings, len(files), decoded)


FEW_TRAINING_IMAGES = 10  # per class: fewer and the class's accuracy (and the choices made by CV) are unreliable


def _few_images_findings(train: dict[str, int], classes: list[str]) -> list[Finding]:
    """A warning per class with too few training images to learn from or to cross-validate with 5 folds."""
    findings = []
    for name in classes:
        n = train.get(name, 0)
        if n >= FEW_TRAINING_IMAGES:
            continue
        folds = ("; a train refuses it (one image cannot be held out of its own fold)" if n == 1 else
                 f"; cross-validation uses {n} folds instead of {K_FOLDS}" if n < K_FOLDS else "")
        findings.append(Finding("few_images", WARNING, f"class {name!r} has only {n} training image"
                                f"{'s' if n != 1 else ''}: its accuracy will be unreliable (aim for "
                                f"{2 * FEW_TRAINING_IMAGES} or more){folds}", [], []))
    return findings


def _relative(path: str, root: Path) -> str:
    return os.path.relpath(path, root)


def _free_name(target: Path) -> Path:
    """`target`, or target with -1, -2, ... before the suffix when it exists (a quarantine never overwrites)."""
    candidate, n = target, 0
    while candidate.exists():
        n += 1
        candidate = target.with_name(f"{target.stem}-{n}{target.suffix}")
    return candidate
