"""A trained model as one self-contained ONNX file, verified against the torch model before it is written.

The file takes uint8 pixels and gives calibrated class probabilities; its metadata_props say what the classes
and the preprocessing are. The mechanics (tracing, int8 quantisation, the comparison) are tlearn.engines.export's.
"""
from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from tlearn.bundle import Bundle
from tlearn.engines import probe_pixels, stream_pixels
from tlearn.predict import expand_paths

if TYPE_CHECKING:
    from tlearn.classifier import Classifier
    from tlearn.engines.export import ExportCheck

CHECK_IMAGES = 64  # held-out images an export is verified on


def export_bundle(bundle: Bundle, model: Classifier, path: Path, *, int8: bool = False,
                  images: Sequence[str | Path] | None = None,
                  calibration: Callable[[Sequence[Path]], Iterable[np.ndarray]] | None = None,
                  batch_size: int = 32, workers: int | None = None) -> ExportCheck:
    """Write `model` (built from `bundle`) to `path` and verify it; see ImageClassifier.export for the promise.

    `calibration` turns training files into uint8 batches for int8's activation ranges."""
    from tlearn.engines.export import export_classifier

    pixels, source = check_pixels(bundle, images, batch_size, workers)
    batches = None
    if int8:
        train = bundle.split_files("train")
        if not train or calibration is None:
            raise ValueError("an int8 export calibrates on the model's training images, and they are no longer "
                             f"where it was trained ({bundle.extra.get('data_checks', {}).get('root')}); "
                             "export without --int8, or put the dataset back")
        batches = calibration(train)
    return export_classifier(model, bundle.preprocessing, Path(path), properties(bundle, "int8" if int8 else "fp32"),
                             pixels, source, batches)


def check_pixels(bundle: Bundle, images: Sequence[str | Path] | None, batch_size: int = 32,
                 workers: int | None = None) -> tuple[np.ndarray, str]:
    """uint8 pixels an export is verified on, and where they come from: `images`, else up to 64 of the model's
    own test (or val) images, else scikit-image's photos."""
    preprocessing = bundle.preprocessing
    if images:
        paths, missing = expand_paths(images)
        if missing or not paths:
            raise FileNotFoundError(f"no image to verify the export on: {missing[0].path if missing else images}")
        source = f"{len(paths)} image(s) given"
    else:
        split = "test" if bundle.split_files("test") else "val"
        recorded = bundle.split_files(split)
        paths = recorded[::max(1, len(recorded) // CHECK_IMAGES)][:CHECK_IMAGES]
        source = f"{len(paths)} images of the model's {split} split"
        if not paths:
            return probe_pixels(preprocessing), "scikit-image's sample photos (the training data is not here)"
    batches = list(stream_pixels(paths, preprocessing, batch_size, workers))
    errors = [(paths[i], reason) for b in batches for i, reason in b.errors]
    if errors:
        raise ValueError(f"cannot read {errors[0][0]}: {errors[0][1]}")
    return np.concatenate([b.pixels for b in batches]), source


def properties(bundle: Bundle, precision: str) -> dict[str, str]:
    """What a consumer of the exported ONNX file needs to know, as its metadata_props."""
    prep, size = bundle.preprocessing, bundle.preprocessing.input_size
    temperature = bundle.temperature()
    return {
        "producer": f"tlearn {metadata.version('tlearn')}",
        "classes": json.dumps(bundle.classes),
        "input": f"pixels: uint8 RGB (batch, 3, {size}, {size}), the image resized ({prep.interpolation}, shorter "
                 f"side to {prep.resize_size()}) and centre-cropped to {size}x{size}; mean/std are applied inside",
        "output": f"probabilities: float32 (batch, {len(bundle.classes)}), calibrated class probabilities "
                  f"(softmax of logits / temperature {temperature:.4g}) in the order of `classes`",
        "preprocessing": json.dumps({**prep.to_dict(), "resize_shorter_side": prep.resize_size(),
                                     "crop": "centre", "channels": "RGB", "layout": "NCHW", "dtype": "uint8"}),
        "temperature": repr(temperature),
        "precision": precision,
        "backbone": json.dumps({k: bundle.backbone.get(k) for k in ("name", "architecture", "precision")}),
    }
