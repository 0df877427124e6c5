"""A trained model as one self-contained ONNX file, verified against the torch model before it is written.

The file takes uint8 pixels and gives calibrated class probabilities; its metadata_props say what the classes
and the preprocessing are. The mechanics (tracing, int8 quantisation, the comparison) are tlearn.engines.export's.
"""
from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from tlearn.bundle import Bundle
from tlearn.errors import TlearnError, require
from tlearn.outputs import OutputRefused
from tlearn.predict import Predictor, expand_paths

if TYPE_CHECKING:
    from tlearn.engines.export import ExportCheck

CHECK_IMAGES = 64  # held-out images an export is verified on
CALIBRATION_IMAGES = 128  # int8 activation ranges: enough images to cover the classes, few enough to be quick


def export_bundle(bundle: Bundle, predictor: Predictor, path: Path, *, int8: bool = False,
                  images: Sequence[str | Path] | None = None, seed: int = 0) -> ExportCheck:
    """Write the torch model built from `bundle` to `path` as ONNX and verify it; see ImageClassifier.export.

    The images it is checked (and, for int8, calibrated) on go through the predictor's pixel pipeline."""
    require("torch", "train", "exporting a model")
    check_export_path(Path(path))
    from tlearn.engines.export import export_classifier

    model = bundle.build_model()
    from tlearn.engines import PixelsToOutputs, TorchEngine
    from tlearn.predict import check_engine

    # the backbone weights are what the export is made of: they must compute the engine's reference features
    check_engine(bundle, TorchEngine(PixelsToOutputs(model.backbone, bundle.preprocessing)))
    pixels, source = check_pixels(bundle, predictor, images)
    batches = None
    if int8:
        train = bundle.split_files("train")
        if not train:
            raise TlearnError("an int8 export calibrates on the model's training images, and they are no longer "
                              f"where it was trained ({bundle.extra.get('data_checks', {}).get('root')}); "
                              "export without --int8, or put the dataset back")
        order = np.random.default_rng(seed).permutation(len(train))[:CALIBRATION_IMAGES]
        batches = (b.pixels for b in predictor.pixel_batches([train[i] for i in sorted(order)]) if len(b.indices))
    return export_classifier(model, bundle.preprocessing, Path(path),
                             properties(bundle, "int8" if int8 else "fp32"), pixels, source, batches)


def export_openvino_bundle(bundle: Bundle, predictor: Predictor, path: Path, *,
                           images: Sequence[str | Path] | None = None, seed: int = 0) -> ExportCheck:
    """The whole classifier as OpenVINO IR (`path`, an .xml, and its .bin): the ONNX export (verified), converted,
    and verified against torch again on the same images. Same input and output as the ONNX file; its metadata in
    the model's rt_info under "tlearn"."""
    import tempfile

    path = Path(path)
    if path.suffix.lower() != ".xml":
        raise OutputRefused(f"cannot write {path}: an OpenVINO model is an .xml file (with its .bin beside it)")
    for target in (path, path.with_suffix(".bin")):
        if target.is_dir() or (os.path.lexists(target) and not _is_tlearn_openvino(path)):
            raise OutputRefused(f"{target} exists and is not an OpenVINO model that tlearn exported: refusing to "
                                "overwrite it; choose another --out")
    if not path.parent.is_dir():
        raise OutputRefused(f"cannot write {path}: the folder {path.parent} does not exist")
    from tlearn.engines.export import onnx_to_openvino, torch_probabilities

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.onnx.") as folder:
        onnx_file = Path(folder) / "model.onnx"
        first = export_bundle(bundle, predictor, onnx_file, images=images, seed=seed)
        pixels, source = check_pixels(bundle, predictor, images)
        reference = torch_probabilities(bundle.build_model(), bundle.preprocessing, pixels)
        props = {**properties(bundle, "fp32"), "verification_onnx": json.dumps(first.to_dict())}
        return onnx_to_openvino(onnx_file, path, props, reference, pixels, source)


def _is_tlearn_openvino(xml: Path) -> bool:
    try:
        with open(xml, "rb") as handle:
            if b"<net " not in handle.read(4096):  # not OpenVINO IR: not handed to OpenVINO's readers at all
                return False
        from tlearn.engines.runtimes import openvino_core

        return openvino_core().read_model(str(xml)).has_rt_info(["tlearn", "producer"])
    except Exception:  # not an OpenVINO model at all, or no .bin beside it
        return False


def check_export_path(path: Path) -> None:
    """Refuse an --out that would replace anything but an ONNX file tlearn exported (a user's photo, say)."""
    if path.is_dir():
        raise OutputRefused(f"cannot write {path}: it is a folder; give a file name ending in .onnx")
    if os.path.lexists(path) and not _is_tlearn_export(path):
        raise OutputRefused(f"{path} exists and is not an ONNX file that tlearn exported: refusing to overwrite "
                            "it; choose another --out")
    if not path.parent.is_dir():
        raise OutputRefused(f"cannot write {path}: the folder {path.parent} does not exist")


def _is_tlearn_export(path: Path) -> bool:
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX at all (any parse error of any file)
        return False
    return any(p.key == "producer" and p.value.startswith("tlearn") for p in model.metadata_props)


def check_pixels(bundle: Bundle, predictor: Predictor, images: Sequence[str | Path] | None) -> tuple[np.ndarray, str]:
    """uint8 pixels an export is verified on, and where they come from: `images`, else up to 64 of the model's
    own test (or val) images, else the probe photos its engine was verified on."""
    if images:
        paths, missing = expand_paths(images)
        if missing or not paths:
            raise TlearnError(f"no image to verify the export on: {missing[0].source if missing else images}")
        source = f"{len(paths)} image(s) given"
    else:
        split = "test" if bundle.split_files("test") else "val"
        recorded = bundle.split_files(split)
        paths = recorded[::max(1, len(recorded) // CHECK_IMAGES)][:CHECK_IMAGES]
        source = f"{len(paths)} images of the model's {split} split"
        if not paths:
            from tlearn.engines import read_reference

            return read_reference(bundle.engine_files[1])[0], "the probe photos (the training data is not here)"
    batches = list(predictor.pixel_batches(paths))
    errors = [(paths[i], reason) for b in batches for i, reason in b.errors]
    if errors:
        raise TlearnError(f"cannot read {errors[0][0]}: {errors[0][1]}")
    return np.concatenate([b.pixels for b in batches]), source


def properties(bundle: Bundle, precision: str) -> dict[str, str]:
    """What a consumer of the exported ONNX file needs to know, as its metadata_props."""
    prep, size = bundle.preprocessing, bundle.preprocessing.input_size
    return {
        "producer": f"tlearn {metadata.version('tlearn')}",
        "classes": json.dumps(bundle.classes),
        "input": f"pixels: uint8 RGB (batch, 3, {size}, {size}), the image resized ({prep.interpolation}, shorter "
                 f"side to {prep.resize_size()}) and centre-cropped to {size}x{size}; mean/std are applied inside",
        "output": f"probabilities: float32 (batch, {len(bundle.classes)}), calibrated class probabilities "
                  f"(softmax of logits / temperature {bundle.temperature:.4g}) in the order of `classes`",
        "preprocessing": json.dumps({**prep.to_dict(), "resize_shorter_side": prep.resize_size(),
                                     "crop": "centre", "channels": "RGB", "layout": "NCHW", "dtype": "uint8",
                                     "rule": prep.rule()}),
        "temperature": repr(bundle.temperature),
        "precision": precision,
        "backbone": json.dumps({"name": bundle.backbone.name, "architecture": bundle.backbone.architecture,
                                "precision": bundle.backbone.precision}),
    }
