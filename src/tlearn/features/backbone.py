"""The frozen backbone behind feature extraction, built only when nothing cheaper will do.

In order of cost: nothing (every feature cached), the engine exported and verified for these exact weights before
(opened from its files: no torch, no timm), the torch network built from the weights file (the first time on a
machine: it is then exported, verified and compiled once, and its tensors are kept beside the features).
"""
from __future__ import annotations

import functools
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from tlearn.backbones import BackboneSpec
from tlearn.backbones.registry import WeightsInfo
from tlearn.engines import (
    REFERENCE_FILE,
    intact,
    open_engine,
    open_exported,
    recorded_verdicts,
    state_key,
    stream_pixels,
)
from tlearn.errors import OutputError
from tlearn.features.cache import FeatureCache

if TYPE_CHECKING:
    from torch import nn

    from tlearn.device import DeviceChoice

CLASSIFIER_PREFIX = "imagenet_classifier."  # its tensors' names in the kept backbone file
CALIBRATION_IMAGES = 128  # int8 activation ranges: enough images to cover the classes, few enough to be quick


@dataclass(frozen=True)
class ExportedEngine:
    """The verified exported files of one backbone at one precision, ready to ship in a model folder."""

    model_file: Path
    reference_file: Path
    verdicts: dict
    precision: str
    feature_map_file: Path | None = None  # the backbone up to its last spatial map (heat maps), when it has one


def import_torch_early(cache: FeatureCache) -> threading.Thread | None:
    """Start importing torch and timm on a thread when this train will build the torch network: the first train of
    these weights on this machine (no backbone tensors kept beside the features yet).

    The import takes ~3 s, mostly Python holding the GIL, and the network is needed only once the data is found
    and hashed, which is file reading and hashing that release the GIL: the two overlap on two cores."""
    if cache.has_backbone_state():
        return None
    thread = threading.Thread(target=_import_torch, name="tlearn-import-torch", daemon=True)
    thread.start()
    return thread


def import_early(modules: tuple[str, ...]) -> threading.Thread:
    """Start importing `modules` on a thread (each import happens once per process; a later `import` waits for it)."""
    def load() -> None:
        import importlib

        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError:  # the step that needs it says what is missing
                pass

    thread = threading.Thread(target=load, name="tlearn-import", daemon=True)
    thread.start()
    return thread


def _import_torch() -> None:
    try:
        import timm  # noqa: F401
        import torch  # noqa: F401
    except ImportError:  # the base install: the step that needs torch says which extra to install
        pass


class FrozenBackbone:
    """Backbone `spec` with weights `info` at `precision`, for extraction; everything built lazily, once."""

    def __init__(self, spec: BackboneSpec, info: WeightsInfo, key: str, cache: FeatureCache, *, engine: str = "auto",
                 precision: str = "fp32", calibration_paths: Sequence[Path] = (), seed: int = 0,
                 workers: int | None = None, progress: bool = True, network: nn.Module | None = None,
                 device: DeviceChoice | None = None):
        self.spec, self.info, self.key, self.cache = spec, info, key, cache
        self.device = device  # a GPU/TPU (tlearn.device): features come from torch there; None or cpu: the engines
        self.engine_name, self.precision, self.seed, self.workers = engine, precision, seed, workers
        self.calibration_paths, self.progress = list(calibration_paths), progress
        self._network = network
        self._classifier: tuple[np.ndarray, np.ndarray] | None = None  # set when `network()` builds it
        self.build_seconds = 0.0  # spent building, exporting and compiling (not extracting)
        self.opened = None  # the engine, once `engine()` has opened it (a Predictor of the head can reuse it)
        self._exported_lock = threading.Lock()
        self._prepared: threading.Thread | None = None
        self.feature_map_engine = None  # opened by `prepare_feature_map` (the report's heat maps reuse it)

    @property
    def built(self) -> bool:
        return self._network is not None

    def network(self) -> nn.Module:
        """The torch network with its pretrained weights (eval mode), built once; its ImageNet classifier is kept
        aside (`imagenet_classifier`) and removed, so that the network gives pooled features."""
        if self._network is None:
            from tlearn.backbones import create_backbone
            from tlearn.backbones.registry import imagenet_classifier

            model = create_backbone(self.spec.name, Path(self.info.source), imagenet_head=True)[0]
            self._classifier = imagenet_classifier(model)
            model.reset_classifier(0)
            self._network = model.eval()  # modules the reset made start in training mode
        return self._network

    @functools.cached_property
    def _stored(self) -> dict[str, np.ndarray] | None:
        return None if self.built else self.cache.backbone_state()

    @functools.cached_property
    def state(self) -> dict[str, np.ndarray]:
        """The backbone's tensors (for the bundle): kept beside its features after the first build (with its
        ImageNet classifier's, under their own names)."""
        if self._stored is not None:
            return {k: v for k, v in self._stored.items() if not k.startswith(CLASSIFIER_PREFIX)}
        state = {k: v.detach().numpy() for k, v in self.network().state_dict().items()}
        classifier = dict(zip((f"{CLASSIFIER_PREFIX}weight", f"{CLASSIFIER_PREFIX}bias"), self._classifier or ()))
        self.cache.put_backbone_state({**state, **classifier})
        return state

    @functools.cached_property
    def imagenet_classifier(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(weight, bias) of the pretrained ImageNet classifier on the pooled features, or None when the backbone
        has none (or the network was given, e.g. fine-tuned: its features no longer fit that classifier)."""
        if self._stored is not None:
            weight, bias = (self._stored.get(f"{CLASSIFIER_PREFIX}{n}") for n in ("weight", "bias"))
            return None if weight is None or bias is None else (weight, bias)
        self.state  # noqa: B018  (builds the network when nothing is stored)
        return self._classifier

    @functools.cached_property
    def engine_key(self) -> str:
        return state_key(self.state, self.spec.preprocessing)

    @functools.cache
    def engine(self):
        """The engine running the backbone: from its verified exported files when there are, else exported now."""
        if self.device is not None and not self.device.is_cpu:  # torch on the GPU: the reference itself
            from tlearn.device import torch_device
            from tlearn.engines.reference import PixelsToOutputs, TorchEngine

            self.opened = TorchEngine(PixelsToOutputs(self.network(), self.spec.preprocessing), self.precision,
                                      torch_device(self.device))
            return self.opened
        exported = None if self.built else open_exported(self.engine_key, self.cache.engines, self.engine_name,
                                                         self.precision)
        if exported is not None:
            self.opened = exported
            return exported
        start = time.perf_counter()
        if self.progress:
            print(f"building the {self.spec.name} engine once for these weights (export, verification, compile)",
                  file=sys.stderr)
        engine = self._export(self.engine_name)
        self.build_seconds = time.perf_counter() - start
        self.opened = engine
        return engine

    def _export(self, engine: str):
        """open_engine in the cache's engines folder; a disk that refuses the files moves them to a temporary one."""
        calibration = self._calibration if self.calibration_paths else None
        try:
            return open_engine(self.network(), self.spec.preprocessing, self.cache.engines, engine, self.precision,
                               calibration)
        except OutputError as exc:
            if not self.cache.storing:
                raise
            self.cache.stop_storing(exc)
            return open_engine(self.network(), self.spec.preprocessing, self.cache.engines, engine, self.precision,
                               calibration)

    def prepare_feature_map(self) -> None:
        """On a thread, while the head is chosen: the verified files of the engine (the feature-map engine cut from
        them) and the feature-map engine opened, for the report's heat maps. Only once this train opened the
        engine (it extracted something): a re-train on cached features opens no engine at all."""
        if self.opened is None or self._prepared is not None:
            return

        def prepare() -> None:
            from tlearn.engines.feature_map import open_feature_map
            from tlearn.errors import TlearnError
            from tlearn.predict import compile_cache

            try:
                exported = self.exported()
                if exported.feature_map_file is not None:
                    self.feature_map_engine = open_feature_map(
                        exported.feature_map_file, exported.reference_file, getattr(self.opened, "name", "auto"),
                        getattr(self.opened, "precision", "fp32"), compile_cache())
            except (TlearnError, OSError):  # the steps that need them do it again, and say what went wrong
                pass

        self._prepared = threading.Thread(target=prepare, name="tlearn-feature-map", daemon=True)
        self._prepared.start()

    def exported(self) -> ExportedEngine:
        """The verified files of the engine, exporting them first if they are not there (a cache emptied by hand)."""
        if self._prepared is not None and self._prepared is not threading.current_thread():
            self._prepared.join()
        with self._exported_lock:
            return self._exported()

    def _exported(self) -> ExportedEngine:
        name = f"model-{'int8' if self.precision == 'int8' else 'fp32'}.onnx"
        folder = self.cache.engines / self.engine_key
        verdicts = recorded_verdicts(folder)
        if not (intact(folder / name) and intact(folder / REFERENCE_FILE) and any(v["ok"] for v in verdicts.values())):
            # the fastest exported engine that verifies (the model folder never ships the torch engine)
            self._export("auto")
            folder = self.cache.engines / self.engine_key  # a temporary folder if the cache's disk refused them
            verdicts = recorded_verdicts(folder)
        model_file = folder / name
        return ExportedEngine(model_file, folder / REFERENCE_FILE, verdicts, self.precision, self._feature_map(folder))

    def _feature_map(self, folder: Path) -> Path | None:
        """The feature-map engine of these weights (tlearn.engines.feature_map), cut from the backbone's graph or
        exported beside it once (the torch export builds the network)."""
        from tlearn.engines.feature_map import export_feature_map, known_or_cut

        fp32 = folder / "model-fp32.onnx"
        known = known_or_cut(folder, fp32 if intact(fp32) else None)
        if known is not None:
            return known or None
        return export_feature_map(self.network(), self.spec.preprocessing, folder)

    def _calibration(self) -> Iterator[np.ndarray]:
        """uint8 batches of a seeded sample of up to 128 training images: int8 activation ranges are fitted on them."""
        paths = self.calibration_paths
        order = np.random.default_rng(self.seed).permutation(len(paths))[:CALIBRATION_IMAGES]
        sample = [paths[i] for i in sorted(order)]
        return (b.pixels for b in stream_pixels(sample, self.spec.preprocessing, 16, self.workers) if len(b.indices))
