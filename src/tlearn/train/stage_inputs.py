"""The fine-tuning stage's inputs: cached trunk activations when the trunk is frozen and the views are fixed, the
full images otherwise; scored splits always through the one pixel pipeline; and the frozen features the head is
refitted on without the inner split."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from tlearn.backbones import BackboneSpec
from tlearn.data import Dataset
from tlearn.train.augment import CACHEABLE, ViewSpec, train_transform
from tlearn.train.finetune import FinetuneModule, FinetuneSettings, StageData
from tlearn.train.inputs import AugmentedImages, CachedViews, EvalPixels, eval_pixels
from tlearn.train.trunk import (
    TrunkCache,
    TrunkCut,
    cut_backbone,
    trunk_key,
    trunk_outputs,
)

SCORED_SPLITS = ("inner", "val", "test")
TRAIN_DTYPE, EVAL_DTYPE = "float16", "float32"  # many views of train, kept small; scored splits kept exact


@dataclass
class StageInputs:
    stage: StageData
    cut: TrunkCut | None  # set when the loop trains on cached trunk activations
    scored: dict[str, torch.utils.data.Dataset]  # inner, val, test (those present): eval inputs
    scored_labels: dict[str, np.ndarray]
    scored_paths: dict[str, list[Path]]
    frozen_features: dict[str, np.ndarray]  # "train" (without inner), "inner": the frozen backbone's features
    frozen_labels: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)


def prepare_inputs(module: FinetuneModule, dataset: Dataset, spec: BackboneSpec, inner: np.ndarray,
                   settings: FinetuneSettings, unfrozen: list[str], *, workers: int | None, batch_size: int,
                   progress: bool, cache_dir: Path | None) -> StageInputs:
    """Inputs of the loop for `module` (already frozen as the settings say), `inner` marking the inner split."""
    paths, labels = dataset.paths("train"), dataset.labels("train")
    splits = {"train": ([p for p, m in zip(paths, inner) if not m], labels[~inner]),
              "inner": ([p for p, m in zip(paths, inner) if m], labels[inner])}
    splits.update({s: (dataset.paths(s), dataset.labels(s)) for s in ("val", "test") if s in dataset.splits})
    cut, notes = _trunk_cut(module, spec, settings, unfrozen)
    args = {"workers": workers, "batch_size": batch_size, "progress": progress}
    if cut is not None:
        module.run_top_only(cut.top)
        return _cached(module, spec, cut, splits, settings, notes, cache_dir=cache_dir, **args)
    return _images(module, spec, splits, settings, notes, **args)


def _trunk_cut(module: FinetuneModule, spec: BackboneSpec, settings: FinetuneSettings,
               unfrozen: list[str]) -> tuple[TrunkCut | None, list[str]]:
    """The cut to cache below, or None and why the full-image loop runs instead."""
    if not settings.trunk_cache:
        return None, ["full-image loop: trunk cache switched off"]
    if settings.augment not in CACHEABLE:
        return None, [f"full-image loop: augmentation {settings.augment!r} draws new pixels every epoch"]
    one_device = settings.devices in ("1", "auto") or settings.devices.rstrip(",").isdigit()  # "N,": GPU N alone
    if not one_device or settings.num_nodes != 1 or settings.strategy != "auto":
        return None, ["full-image loop: distributed training"]
    cut = cut_backbone(module.model.backbone, unfrozen, spec.preprocessing.input_size)
    if cut is None:
        return None, ["full-image loop: no frozen trunk below the unfrozen modules (or not a chain of modules)"]
    return cut, [f"trunk cached below {cut.name}"]


def _cached(module: FinetuneModule, spec: BackboneSpec, cut: TrunkCut, splits: dict, settings: FinetuneSettings,
            notes: list[str], *, workers, batch_size, progress, cache_dir) -> StageInputs:
    prep = spec.preprocessing
    views = ViewSpec(settings.views if settings.augment == "flip" else 1)
    one = ViewSpec(1)

    def outputs(split: str, spec_views: ViewSpec, dtype: str):
        cache = TrunkCache(trunk_key(spec.architecture, cut, prep, spec_views, dtype), cache_dir)
        return trunk_outputs(cut, prep, splits[split][0], spec_views, cache, dtype, batch_size, workers, progress,
                             split)

    train = outputs("train", views, TRAIN_DTYPE)
    scored = {s: outputs(s, one, EVAL_DTYPE) for s in SCORED_SPLITS if s in splits}
    train_labels = splits["train"][1][train.kept]
    scored_labels = {s: splits[s][1][out.kept] for s, out in scored.items()}
    sets = {s: TensorDataset(out.activations[:, 0], torch.from_numpy(scored_labels[s])) for s, out in scored.items()}
    stage = StageData(CachedViews(train.activations, train_labels), sets["inner"], sets.get("val"),
                      f"trunk activations below {cut.name} ({views.count} fixed views per train image, cached)")
    features = {"train": _features(cut.top, train.activations[:, 0], batch_size),
                "inner": _features(cut.top, scored["inner"].activations[:, 0], batch_size)}
    computed = train.computed + sum(out.computed for out in scored.values())
    notes.append(f"trunk activations: {computed} image(s) computed now, the others from the cache")
    engines = sorted({out.engine for out in (train, *scored.values()) if out.engine})
    if engines:
        notes.append(f"trunk forward: {'; '.join(engines)}")
    return StageInputs(stage, cut, sets, scored_labels,
                       {s: [splits[s][0][i] for i in out.kept] for s, out in scored.items()},
                       features, {"train": train_labels, "inner": scored_labels["inner"]}, notes)


def _images(module: FinetuneModule, spec: BackboneSpec, splits: dict, settings: FinetuneSettings,
            notes: list[str], *, workers, batch_size, progress) -> StageInputs:
    from tlearn.data.decoded import decode_resized

    prep = spec.preprocessing
    train_paths, train_labels = splits["train"]
    images = decode_resized(train_paths, train_labels, prep.resize_size(), prep.interpolation, workers, progress,
                            "train")
    scored, scored_labels, scored_paths = {}, {}, {}
    for s in (s for s in SCORED_SPLITS if s in splits):
        pixels, decoded = eval_pixels(splits[s][0], prep, batch_size, workers)
        scored_labels[s] = splits[s][1][decoded.kept]
        scored_paths[s] = [splits[s][0][i] for i in decoded.kept]
        scored[s] = EvalPixels(pixels, scored_labels[s], prep)
    train_pixels, decoded = eval_pixels(train_paths, prep, batch_size, workers)  # the frozen features' input
    stage = StageData(AugmentedImages(images, train_transform(prep, settings.augment)), scored["inner"],
                      scored.get("val"), "images")
    backbone = module.model.backbone
    unlabelled = EvalPixels(train_pixels, np.zeros(len(train_pixels), np.int64), prep)
    features = {"train": _features(backbone, unlabelled, batch_size),
                "inner": _features(backbone, scored["inner"], batch_size)}
    return StageInputs(stage, None, scored, scored_labels, scored_paths, features,
                       {"train": train_labels[decoded.kept], "inner": scored_labels["inner"]}, notes)


@torch.inference_mode()
def _features(network: torch.nn.Module, inputs, batch_size: int) -> np.ndarray:
    """Pooled features of the network, still frozen, in eval mode, on a tensor or a dataset of (input, label)."""
    was_training = network.training
    network.eval()
    if isinstance(inputs, torch.Tensor):
        batches = (inputs[i:i + batch_size].float() for i in range(0, len(inputs), batch_size))
    else:
        batches = (torch.stack([inputs[j][0] for j in range(i, min(i + batch_size, len(inputs)))])
                   for i in range(0, len(inputs), batch_size))
    out = [network(x.contiguous(memory_format=torch.channels_last)).float() for x in batches]
    network.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
