"""The training recipe, composed: (backbone choice) -> the named steps of tlearn.train.steps -> (fine-tune) ->
the bundle. The one place that knows the order; every piece it calls is one-way below it:

    fit -> backbone_choice -> steps -> choices -> head
    fit -> stage2 -> steps, recipe (the fine-tune stage)
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from tlearn.device import DeviceChoice, batch_size_for, resolve_device
from tlearn.evaluate import painter
from tlearn.features import FeatureCache
from tlearn.features.backbone import import_early, import_torch_early
from tlearn.train.backbone_choice import BackboneChoice, choose_backbone
from tlearn.train.settings import AUTO, TrainSettings
from tlearn.train.stage2 import fine_tune_bundle
from tlearn.train.steps import (
    FoundData,
    TrainResult,
    assemble,
    attach_engine,
    calibrate_bundle,
    choose_the_head,
    extract,
    feature_key_for,
    find_data,
    frozen_backbone,
    keep_out_of_fold,
    wants_finetune,
)


def run_recipe(data: str | Path, settings: TrainSettings, resume: bool = False) -> TrainResult:
    """Train a classifier on `data`: the whole recipe, step by step."""
    start = time.perf_counter()
    device = resolve_device(settings.device)  # before any work: a device the machine lacks is one clear line
    settings = on_device(settings, device)
    found, choice = None, None
    if settings.backbone == AUTO:  # every backbone is tried on the data before one backbone's cache is opened
        found = find_data(data, settings)
        settings, choice = resolve_backbone(found, settings)
    with FeatureCache(feature_key_for(settings), settings.cache_dir) as cache:
        importing = import_torch_early(cache)
        found = found or find_data(data, settings)
        if _will_extract(found, cache) and not painter.prepare_folds():
            # the folds need scikit-learn (~1 s of import): while the features come (the CLI's painter process,
            # when there is one, imports it on a core of its own and computes the folds there)
            import_early(("sklearn.model_selection",))
        backbone = frozen_backbone(found, settings, cache, device)
        split = extract(found, backbone, cache, settings)
        backbone.prepare_feature_map()  # on a thread, while the head is chosen (when this train opened the engine)
        views, head_choice, fit, prior = choose_the_head(found, backbone, cache, split, settings)
        result = assemble(found, backbone, split, fit, settings, views, head_choice, prior)
        calibrate_bundle(result)
        keep_out_of_fold(result, found, split, head_choice)
        if wants_finetune(result, settings):
            fine_tune_bundle(result, found.dataset, backbone, fit, split, settings, resume)
        else:
            attach_engine(result.bundle, backbone.exported())
            result.engine, result.feature_map_engine = backbone.opened, backbone.feature_map_engine
        if importing is not None:
            importing.join()  # done long ago unless every feature was cached (then torch was never needed)
    result.bundle.training["device"] = result.bundle.metrics["device"] = result.summary.device = device.to_dict()
    if choice is not None:
        result.bundle.training["backbone_choice"] = result.summary.backbone_choice = choice.to_dict()
    result.summary.seconds = time.perf_counter() - start
    return result


def on_device(settings: TrainSettings, device: DeviceChoice) -> TrainSettings:
    """The settings for `device`: on a GPU or TPU the backbone runs in torch there, in batches its free memory
    holds, and fine-tuning asks Lightning for that accelerator (unless --accelerator named one)."""
    if device.is_cpu:
        return settings
    finetune = settings.finetune
    if finetune.accelerator == "auto":
        finetune = replace(finetune, accelerator=device.accelerator,
                           devices=finetune.devices if finetune.devices != "1" else device.lightning_devices)
    return replace(settings, engine="torch", batch_size=batch_size_for(device, settings.batch_size),
                   finetune=finetune)


def _will_extract(found: FoundData, cache: FeatureCache) -> bool:
    """Whether some training image's features are not cached yet (a first train, or new images)."""
    hashes = [found.hashes[p] for p in found.dataset.paths("train") if found.hashes.get(p)]
    return len(cache.get_many(hashes)) + len(cache.failures(hashes)) < len(hashes)


def resolve_backbone(found: FoundData, settings: TrainSettings) -> tuple[TrainSettings, BackboneChoice | None]:
    """The settings with `--backbone auto` resolved to the backbone it keeps, and the record of that choice."""
    if settings.backbone != AUTO:
        return settings, None
    choice = choose_backbone(found, settings)
    return replace(settings, backbone=choice.chosen), choice
