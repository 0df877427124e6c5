"""The frozen trunk of a fine-tune, computed once: its activations of each image's fixed views, cached on disk.

When only the top of a backbone learns, the lower blocks see the same pixels every epoch unless augmentation
changes them. With a fixed, seeded set of views per image (tlearn.train.augment.ViewSpec), the trunk's output is
computed once per image and view and kept under $TLEARN_CACHE/trunk/<key>/<content hash>.npy, keyed like the
feature cache (architecture, the trunk's exact weights, preprocessing, views, cut, storage dtype): every epoch, and
every re-run on the same images, trains the top on those activations without running the trunk again.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from torch import nn

from tlearn.backbones import Preprocessing, state_sha256
from tlearn.data.decode import DecodeError, content_hash, load_image
from tlearn.data.pipeline import default_workers
from tlearn.features.cache import default_cache_dir
from tlearn.files import write_atomically
from tlearn.train.augment import ViewSpec, view_pixels

TRUNK_FORMAT = 1  # bump when the way trunk activations are computed changes
PROBE_TOLERANCE = 1e-4  # trunk then top must give the backbone's own output: the split is checked, not assumed
# an exported trunk must give eager torch's activations to within this (fp32: differences of rounding only; the
# activations are then stored as float16, ~1e-3 relative, for train's views)
ENGINE_TOLERANCE = 1e-3


@dataclass
class TrunkCut:
    """A backbone split in two in forward order: `trunk` (frozen, cached) then `top` (the part that learns)."""

    name: str  # the first module of the top, e.g. "blocks.5.0"
    trunk: nn.Sequential
    top: nn.Sequential

    def trunk_sha256(self) -> str:
        return state_sha256({k: v.detach().cpu().numpy() for k, v in self.trunk.state_dict().items()})


def cut_backbone(backbone: nn.Module, unfrozen: Sequence[str], input_size: int) -> TrunkCut | None:
    """The split just below the first unfrozen module, or None when there is no frozen trunk to cache or the
    backbone's forward is not the chain of its modules (checked on a probe image)."""
    if "" in unfrozen:
        return None
    leaves = list(_chain(backbone, ""))
    opened = [i for i, (name, _) in enumerate(leaves)
              if any(name == u or name.startswith(u + ".") or u.startswith(name + ".") for u in unfrozen)]
    if not opened or opened[0] == 0:
        return None
    cut = opened[0]
    split = TrunkCut(leaves[cut][0], nn.Sequential(*[m for _, m in leaves[:cut]]),
                     nn.Sequential(*[m for _, m in leaves[cut:]]))
    was_training = backbone.training
    backbone.eval()
    with torch.inference_mode():
        probe = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
        same = torch.allclose(backbone(probe), split.top(split.trunk(probe)), atol=PROBE_TOLERANCE)
    backbone.train(was_training)
    return split if same else None


def _chain(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    """(dotted name, module) in forward order, opening nn.Sequential containers (their forward is the chain)."""
    for name, child in module.named_children():
        dotted = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _chain(child, dotted + ".")
        else:
            yield dotted, child


def trunk_key(architecture: str, cut: TrunkCut, preprocessing: Preprocessing, views: ViewSpec, dtype: str) -> str:
    parts = [TRUNK_FORMAT, architecture, cut.trunk_sha256(), preprocessing.to_dict(), views.to_dict(), cut.name,
             dtype]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


class TrunkCache:
    """One .npy file per image (all its views), written atomically: a killed run loses at most the file in flight."""

    def __init__(self, key: str, directory: Path | None = None):
        self.directory = (Path(directory) if directory is not None else default_cache_dir()) / "trunk" / key
        self.directory.mkdir(parents=True, exist_ok=True)

    def get(self, content: str) -> np.ndarray | None:
        try:
            return np.load(self.directory / f"{content}.npy")
        except (OSError, ValueError):
            return None

    def put(self, content: str, activations: np.ndarray) -> None:
        def save(tmp: str) -> None:
            with open(tmp, "wb") as handle:  # a file object: np.save would add ".npy" to a name
                np.save(handle, activations)

        write_atomically(self.directory / f"{content}.npy", save)


@dataclass
class TrunkOutputs:
    """Trunk activations of a list of files: row r of `activations` belongs to paths[kept[r]]."""

    activations: torch.Tensor  # (len(kept), views, C, h, w), in the cache's dtype
    kept: np.ndarray
    failures: list[tuple[Path, str]] = field(default_factory=list)
    computed: int = 0  # images whose views went through the trunk now (the rest came from the cache)
    engine: str = ""  # what ran the trunk, and why (empty when nothing was computed)


def trunk_outputs(cut: TrunkCut, preprocessing: Preprocessing, paths: Sequence[Path], views: ViewSpec,
                  cache: TrunkCache, dtype: str = "float16", batch_size: int = 32, workers: int | None = None,
                  progress: bool = True, description: str = "images") -> TrunkOutputs:
    """Activations of every view of every file, from the cache where present; undecodable files are reported."""
    hashes = [content_hash(p) for p in paths]
    stored = {i: cache.get(h) for i, h in enumerate(hashes) if h is not None}
    found = {i: a for i, a in stored.items() if a is not None and a.shape[0] == views.count and a.dtype == dtype}
    failures = [(Path(paths[i]), "cannot read file") for i, h in enumerate(hashes) if h is None]
    todo = [i for i in stored if i not in found]
    per_forward = max(1, batch_size // views.count)
    forward = TrunkForward(cut, preprocessing)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress or not todo) as bar, \
            ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="tlearn-views") as pool:
        task = bar.add_task(f"trunk activations ({description})", total=len(todo))
        draft = preprocessing.draft_size()  # the draft decoding prediction uses (engines.stream_pixels)
        decode = partial(_views, paths, hashes, preprocessing, views, draft)
        chunks = [todo[s:s + per_forward] for s in range(0, len(todo), per_forward)]
        pending = [pool.map(decode, chunk) for chunk in chunks[:2]]
        for k, chunk in enumerate(chunks):
            decoded = list(pending[k])
            if k + 2 < len(chunks):
                pending.append(pool.map(decode, chunks[k + 2]))
            good = [(i, v) for i, v in zip(chunk, decoded) if not isinstance(v, str)]
            failures.extend((Path(paths[i]), v) for i, v in zip(chunk, decoded) if isinstance(v, str))
            for (i, _), out in zip(good, forward([v for _, v in good])):
                found[i] = out.astype(dtype)
                cache.put(hashes[i], found[i])
            bar.advance(task, len(chunk))
    kept = np.array(sorted(found), dtype=np.int64)
    stacked = torch.from_numpy(np.stack([found[i] for i in kept])) if len(kept) else torch.zeros(0)
    failures.sort(key=lambda item: str(item[0]))
    forward.close()
    return TrunkOutputs(stacked, kept, failures, computed=len(todo), engine=forward.verdict)


def _views(paths: Sequence[Path], hashes: list[str | None], preprocessing: Preprocessing, views: ViewSpec,
           draft: tuple[int, int], i: int) -> np.ndarray | str:
    """uint8 views of file i, or the reason it cannot be used."""
    try:
        return view_pixels(load_image(paths[i], draft), preprocessing, views, hashes[i])
    except DecodeError as exc:
        return exc.reason
    except Exception as exc:  # noqa: BLE001  a transform failing on a strange image must not end the run either
        return f"cannot preprocess image ({type(exc).__name__}: {exc})"


class TrunkForward:
    """The trunk's forward on uint8 views: OpenVINO (fp32) on an exported copy of the trunk when it is installed,
    gives eager torch's activations on the first batch (ENGINE_TOLERANCE) and runs it faster; eager torch otherwise.
    Measured on this machine: EfficientNet-Lite0 below blocks.5, 52-55 img/s eager, 186-235 img/s OpenVINO, largest
    difference 7e-5 (bench/README.md). The choice is made on the first batch, once per call of trunk_outputs."""

    def __init__(self, cut: TrunkCut, preprocessing: Preprocessing):
        self.cut, self.preprocessing = cut, preprocessing
        self.engine, self.verdict, self.folder = None, "", None

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        if not images:
            return []
        views = images[0].shape[0]
        pixels = np.concatenate(images)
        if not self.verdict:
            out = self._choose(pixels)
        elif self.engine is not None:
            out = self.engine(pixels)
        else:
            out = _forward(self.cut.trunk, self.preprocessing, pixels)
        return [out[k * views:(k + 1) * views] for k in range(len(images))]

    def _choose(self, pixels: np.ndarray) -> np.ndarray:
        import tempfile
        import time

        start = time.perf_counter()
        expected = _forward(self.cut.trunk, self.preprocessing, pixels)
        eager = time.perf_counter() - start
        try:
            from tlearn.engines import installed

            if not installed("openvino"):
                self.verdict = "eager torch (OpenVINO not installed)"
                return expected
            from tlearn.engines.export import export_onnx
            from tlearn.engines.reference import PixelsToOutputs
            from tlearn.engines.runtimes import OpenVinoEngine

            self.folder = Path(tempfile.mkdtemp(prefix="tlearn-trunk-"))
            engine = OpenVinoEngine(export_onnx(PixelsToOutputs(self.cut.trunk, self.preprocessing),
                                                self.folder / "trunk.onnx"), "fp32")
            engine(pixels)  # its first call includes one-off work
            start = time.perf_counter()
            out = engine(pixels)
            exported = time.perf_counter() - start
        except Exception as exc:  # noqa: BLE001  an export or a runtime that refuses the trunk: eager torch does it
            self.verdict = f"eager torch (the exported trunk could not run: {type(exc).__name__})"
            return expected
        diff = float(np.abs(out - expected).max())
        if diff > ENGINE_TOLERANCE:
            self.verdict = f"eager torch (OpenVINO differed by {diff:.1e})"
        elif exported >= eager:
            self.verdict = f"eager torch (faster here than OpenVINO: {eager:.2f} s against {exported:.2f} s)"
        else:
            self.engine = engine
            self.verdict = (f"OpenVINO fp32 ({eager / exported:.1f}x eager torch on the first batch, largest "
                            f"difference {diff:.1e})")
        return expected

    def close(self) -> None:
        import shutil

        self.engine = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


@torch.inference_mode()
def _forward(trunk: nn.Module, preprocessing: Preprocessing, pixels: np.ndarray) -> np.ndarray:
    """Trunk activations (n, C, h, w) float32 of uint8 pixels (n, 3, H, W), in one eval-mode fp32 forward."""
    x = preprocessing.normalise(torch.from_numpy(pixels)).contiguous(memory_format=torch.channels_last)
    return trunk.eval()(x).contiguous().numpy()
