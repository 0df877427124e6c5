"""A trained model on disk, the only module that knows its format.

    MODEL/config.json          typed, versioned record: classes, backbone, preprocessing, calibration, provenance,
                               the SHA-256 of every other file of the model (checked on every load), and the probe:
                               the calibrated logits, by class name, of the engine reference's photos
    MODEL/model.safetensors    backbone + head tensors
    MODEL/metrics.json         val/test metrics with confidence intervals, and the cross-validated figures
    MODEL/out_of_fold.csv      one row per training image: path (relative to the data), given label, fold,
                               the label the head of the other folds gives, and its calibrated probability of each
                               class (columns "prob:<class>"); what suspect labels and active learning build on
    MODEL/engine/backbone.onnx the backbone's verified exported engine (uint8 pixels in, pooled features out)
    MODEL/engine/reference.safetensors   probe pixels and eager-torch outputs it was verified against
    MODEL/engine/feature-map.onnx        the backbone up to its last spatial feature map (heat maps; optional)
    MODEL/report/              the HTML report (derived; not checked)

Hashes catch accidents, not edits: a folder whose records were re-hashed after an edit (a temperature, the order
of the classes, another model's weights or engine) is caught by meaning. Every config value is bounded to what it
can mean, and the head must give the probe's recorded logits by class name on the reference features (checked
here, in numpy); the Predictor then checks the engine against the reference (`predict.check_engine`).

Nothing in a model folder is a pickle and loading one never unpickles. A folder is written whole or not at all:
`ModelFolder` builds it beside its final place and swaps it in with one atomic rename.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from tlearn.backbones import Preprocessing
from tlearn.backbones.registry import BACKBONES, WeightsInfo
from tlearn.errors import BundleError, EngineError
from tlearn.evaluate.calibration import TEMPERATURE_BOUNDS
from tlearn.files import disk_refusals, fsync_tree, swap_in
from tlearn.files import sha256_file as file_sha256
from tlearn.train.head import ImageNetPrior, LinearHead

FORMAT_VERSION = 4  # 3: "tta" (predictions on the mean of the image's and its mirror's features); 4: the head's
# ImageNet prior (tensors prior.*): a tlearn that reads 3 at most would take it for another model's weights
OLDEST_FORMAT = 2  # read as a model without tta
CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE = "config.json", "model.safetensors", "metrics.json"
ENGINE_FILE, REFERENCE_FILE = "engine/backbone.onnx", "engine/reference.safetensors"
OUT_OF_FOLD_FILE = "out_of_fold.csv"
FEATURE_MAP_FILE = "engine/feature-map.onnx"  # absent from models of older tlearn versions and from VGG's
INTERPOLATIONS = ("bicubic", "bilinear")
PRECISIONS = ("fp32", "bf16", "int8")
# the head's calibrated logits on the reference features, recomputed at load, must match the recorded ones to this
# (the same numpy arithmetic on the same numbers: only the order of float operations can differ)
PROBE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class BackboneRecord:
    """Which network the model is built on and where its weights came from."""

    name: str
    architecture: str
    weights: WeightsInfo
    feature_dim: int
    feature_key: str  # feature-cache key of this exact network (changes when fine-tuning changes the weights)
    precision: str = "fp32"  # of the frozen-backbone forward the head was trained on
    fine_tuned_sha256: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BackboneRecord":
        return cls(**{**data, "weights": WeightsInfo(**data["weights"])})


@dataclass(frozen=True)
class EngineRecord:
    """The exported backbone in the folder, and what it was verified against."""

    precision: str  # of the exported file: fp32 (also run as bf16 by OpenVINO) or int8
    verdicts: dict  # "<runtime>-<version>-<precision>" -> {"ok", "max_abs_diff", "min_cosine", "detail"}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OutOfFold:
    """Each training image scored by a head fitted without its fold (cross-validation): out_of_fold.csv."""

    classes: list[str]
    paths: list[str]  # relative to the dataset root, as in the recorded split
    labels: np.ndarray  # (n,) int: the given label
    folds: np.ndarray  # (n,) int
    proba: np.ndarray  # (n, classes): calibrated

    def to_csv(self) -> str:
        import csv
        import io

        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["path", "label", "fold", "predicted", *(f"prob:{c}" for c in self.classes)])
        for path, label, fold, proba in zip(self.paths, self.labels, self.folds, self.proba):
            writer.writerow([path, self.classes[label], int(fold), self.classes[int(proba.argmax())],
                             *(f"{p:.6g}" for p in proba)])
        return out.getvalue()

    @classmethod
    def read(cls, path: str | Path, classes: list[str]) -> "OutOfFold":
        """Read (and check) an out_of_fold.csv of a model with these classes; BundleError names what is wrong."""
        import csv

        index = {c: i for i, c in enumerate(classes)}
        try:
            with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
                rows = list(csv.reader(f))
            header, body = rows[0], rows[1:]
            if header != ["path", "label", "fold", "predicted", *(f"prob:{c}" for c in classes)]:
                raise ValueError("its columns are not this model's classes")
            proba = np.array([[float(v) for v in r[4:]] for r in body], np.float64).reshape(len(body), len(classes))
            if not np.isfinite(proba).all():
                raise ValueError("a probability is not a number")
            return cls(list(classes), [r[0] for r in body], np.array([index[r[1]] for r in body], np.int64),
                       np.array([int(r[2]) for r in body], np.int64), proba)
        except (OSError, IndexError, KeyError, ValueError) as exc:
            raise BundleError(f"{path} is not a readable out-of-fold table ({exc})") from None


@dataclass
class Bundle:
    """Everything needed to predict, and to trace how the model was made."""

    classes: list[str]
    backbone: BackboneRecord
    preprocessing: Preprocessing
    state: dict[str, np.ndarray]  # "backbone.*" and "head.*" tensors (and "prior.*": the ImageNet classifier)
    temperature: float = 1.0  # calibration: probabilities are softmax(logits / temperature)
    training: dict = field(default_factory=dict)  # recipe settings and what was chosen (provenance, free-form)
    split: dict = field(default_factory=dict)  # the files of each split actually used
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # provenance sections: calibration details, data checks, history
    engine: EngineRecord | None = None
    engine_files: tuple[Path, Path] | None = None  # (exported backbone ONNX, its reference) to ship with the model
    files: dict = field(default_factory=dict)  # SHA-256 of each file, as written in (and checked against) the config
    tta: bool = False  # predictions use the mean of the features of the image and of its mirror (2 forward passes)
    out_of_fold: OutOfFold | None = None  # the training images' cross-validated probabilities (written, not loaded)
    directory: Path | None = None  # where it was loaded from
    feature_map_file: Path | None = None  # the exported backbone up to its last spatial map (heat maps)

    # ---- writing ----------------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the model into `directory`, replacing whatever model was there, whole or not at all."""
        with ModelFolder(directory) as folder:
            self.write(folder)
        return Path(directory)

    def write(self, folder: Path) -> None:
        """Write the bundle's files into `folder` (an empty staging folder: see ModelFolder)."""
        # serialised in memory, written by Python: a full disk is an OSError (safetensors' own writer raises its
        # SafetensorError for it)
        files = {WEIGHTS_FILE: lambda p: p.write_bytes(save({k: np.ascontiguousarray(v) for k, v in self.state.items()},
                                                            metadata={"format": "tlearn"})),
                 METRICS_FILE: lambda p: p.write_text(json.dumps(self.metrics, indent=1))}
        if self.engine_files is not None:
            model_file, reference_file = self.engine_files
            files[ENGINE_FILE] = lambda p: shutil.copyfile(model_file, p)
            files[REFERENCE_FILE] = lambda p: shutil.copyfile(reference_file, p)
        if self.out_of_fold is not None:
            table = self.out_of_fold.to_csv()
            files[OUT_OF_FOLD_FILE] = lambda p: p.write_text(table, encoding="utf-8", errors="surrogateescape")
        if self.feature_map_file is not None:
            files[FEATURE_MAP_FILE] = lambda p: shutil.copyfile(self.feature_map_file, p)
        digests = {}
        for name, write in files.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            write(path)
            digests[name] = file_sha256(path)
        self.files = digests
        # a model without tta is written as format 2, which older tlearn versions read the same way; one with tta
        # as 3, which they refuse (rather than predict on one view what was meant for two)
        version = 4 if "prior.weight" in self.state else 3 if self.tta else OLDEST_FORMAT
        config = {"format": "tlearn-bundle", "format_version": version,
                  "tta": self.tta, "classes": self.classes,
                  "backbone": self.backbone.to_dict(), "preprocessing": self.preprocessing.to_dict(),
                  "temperature": self.temperature, "engine": self.engine.to_dict() if self.engine else None,
                  "probe": self.probe_logits() if self.engine_files else None,
                  "training": self.training, "split": self.split, "extra": self.extra, "files": digests,
                  "versions": _versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        # ASCII escapes: a class or file name that is not valid UTF-8 (surrogates) survives, under any locale
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1, ensure_ascii=True, default=_json_default),
                                          encoding="ascii")

    # ---- reading ----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, *, tensors: bool = True) -> "Bundle":
        """Read and check a model folder: every file's SHA-256 against the config, every config value against its
        type and range, the tensors against the config. BundleError names what is wrong."""
        directory = Path(directory)
        if not directory.is_dir():
            raise BundleError(f"{directory} is not a folder; give the model folder written by `tlearn train`")
        config = _read_json(directory / CONFIG_FILE)
        _check_format(directory, config)
        _check_files(directory, config.get("files"))
        try:
            bundle = cls(
                classes=_classes(config["classes"]), backbone=BackboneRecord.from_dict(config["backbone"]),
                preprocessing=_preprocessing(config["preprocessing"]), state={},
                temperature=_temperature(config["temperature"]), training=dict(config.get("training") or {}),
                split=_split(config.get("split")), metrics=_read_json(directory / METRICS_FILE),
                extra=dict(config.get("extra") or {}),
                engine=EngineRecord(**config["engine"]) if config.get("engine") else None,
                engine_files=(directory / ENGINE_FILE, directory / REFERENCE_FILE) if config.get("engine") else None,
                files=dict(config["files"]), tta=_flag(config.get("tta", False), "tta"), directory=directory,
                feature_map_file=directory / FEATURE_MAP_FILE if FEATURE_MAP_FILE in config["files"] else None)
        except BundleError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{directory / CONFIG_FILE} is incomplete or malformed ({exc!r})") from None
        if not known_architecture(bundle.backbone.architecture):
            raise BundleError(f"{directory / CONFIG_FILE} names an architecture tlearn does not know: "
                              f"{bundle.backbone.architecture!r}")
        if tensors:
            bundle.state = _read_tensors(directory / WEIGHTS_FILE)
            bundle.check_tensors(directory)
            if bundle.engine_files is not None:
                bundle.check_probe(directory, config.get("probe"))
        return bundle

    def read_out_of_fold(self) -> OutOfFold | None:
        """The training images' out-of-fold probabilities of a loaded model (None for a model without them)."""
        if self.out_of_fold is not None:
            return self.out_of_fold
        if self.directory is None or OUT_OF_FOLD_FILE not in self.files:
            return None
        return OutOfFold.read(self.directory / OUT_OF_FOLD_FILE, self.classes)

    def check_tensors(self, directory: Path) -> None:
        head_w, head_b = self.state.get("head.weight"), self.state.get("head.bias")
        if head_w is None or head_b is None:
            raise BundleError(f"{directory / WEIGHTS_FILE} has no head (head.weight and head.bias are needed)")
        def wrong_shape(with_prior: str = "") -> BundleError:
            return BundleError(f"{directory / WEIGHTS_FILE}: the head is {head_w.shape}, but the config has "
                               f"{len(self.classes)} classes and {self.backbone.feature_dim} features{with_prior}")

        if head_w.ndim != 2 or head_w.shape[0] != len(self.classes) or head_b.shape != (len(self.classes),):
            raise wrong_shape()  # another model's weights, or edited classes: said before anything else
        prior = self._prior(directory)
        inputs = self.backbone.feature_dim + (0 if prior is None else prior.weight.shape[0])
        if head_w.shape[1] != inputs:
            raise wrong_shape(f" + {prior.weight.shape[0]} ImageNet probabilities" if prior is not None else "")
        if not (np.isfinite(head_w).all() and np.isfinite(head_b).all()):
            raise BundleError(f"{directory / WEIGHTS_FILE}: the head holds NaN or infinite values")

    def _prior(self, directory: Path | None = None) -> ImageNetPrior | None:
        """The ImageNet prior the head uses (its tensors "prior.*", its scale in the config), or None; BundleError
        when the tensors and the config disagree."""
        where = directory / WEIGHTS_FILE if directory is not None else WEIGHTS_FILE
        weight, bias = self.state.get("prior.weight"), self.state.get("prior.bias")
        head = self.training.get("head")
        record = (head.get("imagenet_prior") if isinstance(head, dict) else None) or {}
        used = record.get("used", False) if isinstance(record, dict) else None
        if weight is None and bias is None and not used:
            return None
        scale = record.get("scale") if isinstance(record, dict) else None
        if weight is None or bias is None or used is not True or isinstance(scale, bool) or \
                not isinstance(scale, (int, float)) or not 0 < scale <= 100:
            raise BundleError(f"{where} and config.json disagree on the head's ImageNet prior (prior.weight, "
                              "prior.bias and training.head.imagenet_prior with used and its scale go together): "
                              "another model's weights or an edited config; restore the folder or train again")
        if weight.ndim != 2 or weight.shape[1] != self.backbone.feature_dim or bias.shape != (weight.shape[0],) or \
                not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise BundleError(f"{where}: the ImageNet prior is {weight.shape} (bias {bias.shape}), but the backbone "
                              f"has {self.backbone.feature_dim} features, or it holds NaN or infinite values")
        return ImageNetPrior(np.asarray(weight, np.float32), np.asarray(bias, np.float32), float(scale))

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        """(probe pixels, eager-torch features of them) the engine was verified against."""
        from tlearn.engines import read_reference

        try:
            return read_reference(self.engine_files[1])
        except EngineError as exc:
            raise BundleError(str(exc)) from None

    def probe_logits(self) -> dict[str, list[float]]:
        """The calibrated logits of the reference photos' features, by class name (the probe written to the config:
        any edit of the classes, the temperature or the head changes them)."""
        logits = self.head(calibrated=True).logits(self.reference()[1]).astype(np.float64)
        return {name: [float(v) for v in logits[:, c]] for c, name in enumerate(self.classes)}

    def check_probe(self, directory: Path, recorded) -> None:
        """The head, classes and temperature must give the logits recorded at training (BundleError otherwise);
        the reference must fit the config (image size, feature dimension)."""
        pixels, features = self.reference()
        size, dim = self.preprocessing.input_size, self.backbone.feature_dim
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size) or features.shape != (len(pixels), dim):
            raise BundleError(f"{directory / REFERENCE_FILE} holds {tuple(pixels.shape)} pixels and "
                              f"{tuple(features.shape)} features, but config.json says {size}x{size} images and "
                              f"{dim} features: the engine or the config is another model's; restore the folder or "
                              "train again")
        if not isinstance(recorded, dict) or set(recorded) != set(self.classes) or not all(
                isinstance(v, list) and len(v) == len(pixels) and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
                for v in recorded.values()):
            raise BundleError(f"{directory / CONFIG_FILE} has no valid probe (the logits, by class name, of the "
                              "reference photos): the config was edited or written by an older tlearn; restore it "
                              "or train again")
        for name, values in self.probe_logits().items():
            for i, (got, want) in enumerate(zip(values, recorded[name])):
                if abs(got - want) > PROBE_TOLERANCE * (1 + abs(want)):
                    raise BundleError(
                        f"{directory} does not give the answers recorded when it was trained (class {name!r} on "
                        f"probe photo {i}: logit {got:.4g}, recorded {want:.4g}): the classes, the temperature or "
                        "the weights were edited, or another model's files were put in (their SHA-256 re-written); "
                        "restore the folder or train again")

    def head(self, calibrated: bool = False) -> LinearHead:
        """The linear head on pooled backbone features (numpy, no torch): logits as it was trained, or divided by
        the calibration temperature (`calibrated`, what predictions use)."""
        scale = self.temperature if calibrated else 1.0
        return LinearHead(self.state["head.weight"] / scale, self.state["head.bias"] / scale, self._prior())

    def backbone_state(self) -> dict[str, np.ndarray]:
        """The backbone's tensors under the backbone network's own names."""
        return {k.removeprefix("backbone."): v for k, v in self.state.items() if k.startswith("backbone.")}

    def split_files(self, split: str) -> list[Path]:
        """The files of `split` the model was trained with, if they are all still where they were; else []."""
        root = self.extra.get("data_checks", {}).get("root")
        files = [Path(root) / relative for relative, _ in self.split.get("files", {}).get(split, [])] if root else []
        return files if files and all(f.is_file() for f in files) else []

    def build_model(self):
        """The torch classifier with the bundle's weights and its calibration folded into the head (eval mode)."""
        from tlearn.errors import require

        require("torch", "train", "building the torch model")
        import timm
        import torch
        from torch import nn

        from tlearn.classifier import Classifier

        with torch.device("meta"):
            backbone = timm.create_model(self.backbone.architecture, pretrained=False, num_classes=0)
        n_features, n_classes, prior = self.backbone.feature_dim, len(self.classes), self._prior()
        with torch.device("meta"):
            imagenet = None if prior is None else nn.Linear(n_features, prior.weight.shape[0])
            model = Classifier(backbone, nn.Linear(self.state["head.weight"].shape[1], n_classes),
                               mirror_mean=self.tta, prior=imagenet, prior_scale=prior.scale if prior else 0.0)
        try:
            model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in self.state.items()}, strict=True,
                                  assign=True)
        except RuntimeError as exc:
            raise BundleError(f"model weights do not fit the {self.backbone.architecture} architecture: "
                              f"{str(exc).splitlines()[0]} ...") from None
        _fill_buffers(model)
        with torch.no_grad():
            model.head.weight /= self.temperature
            model.head.bias /= self.temperature
        return model.eval()


RUN_FOLDER = "run"  # fine-tuning checkpoints and logs, kept across re-writes of the model (--resume needs them)


class ModelFolder:
    """A staging folder beside `target` that replaces it on a clean exit (atomically, where Linux allows), and
    vanishes on an error. A `target` that exists must be a tlearn model, or hold nothing but a fine-tune's run/
    folder: anything else is the user's, and is refused. A run/ folder is carried over into the new model."""

    def __init__(self, target: str | Path):
        self.target = Path(target)
        if self.target.exists():
            if not self.target.is_dir():
                raise BundleError(f"{self.target} is a file; give a folder for the model")
            others = [p for p in self.target.iterdir() if p.name != RUN_FOLDER]
            if others and not (self.target / CONFIG_FILE).is_file():
                raise BundleError(f"{self.target} is a folder that is not a tlearn model and not empty; refusing to "
                                  "replace it: choose another --out, or empty it")
            if (self.target / CONFIG_FILE).is_file() and _read_json_or_none(self.target / CONFIG_FILE, "format") \
                    != "tlearn-bundle":
                raise BundleError(f"{self.target} holds a config.json that is not a tlearn model's; refusing to "
                                  "replace it")

    def __enter__(self) -> Path:
        parent = self.target.resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{self.target.name}.new-"))
        except OSError as exc:
            raise BundleError(f"cannot write the model next to {self.target} (--out): {exc.strerror or exc}; "
                              "choose another --out") from None
        os.chmod(self.staging, 0o755)
        return self.staging

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            with disk_refusals(self.target, "--out"):  # a full or read-only disk: OutputError naming --out
                if isinstance(exc, OSError):
                    raise exc
            return
        try:
            with disk_refusals(self.target, "--out"):
                fsync_tree(self.staging)
                if (self.target / RUN_FOLDER).is_dir() and not (self.staging / RUN_FOLDER).exists():
                    os.rename(self.target / RUN_FOLDER, self.staging / RUN_FOLDER)
                swap_in(self.staging, self.target)
        except BaseException as error:
            shutil.rmtree(self.staging, ignore_errors=True)
            if isinstance(error, OSError):
                raise BundleError(f"cannot write the model to {self.target}: {error.strerror or error}") from None
            raise


def is_model_folder(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and _read_json_or_none(Path(path) / CONFIG_FILE, "format") \
        == "tlearn-bundle"


# ---- checks -------------------------------------------------------------------------------------------------------
def _check_format(directory: Path, config: dict) -> None:
    if config.get("format") != "tlearn-bundle":
        raise BundleError(f"{directory / CONFIG_FILE} is not a tlearn model config")
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{directory / CONFIG_FILE}: format_version must be a whole number, not {version!r}")
    if version > FORMAT_VERSION:
        raise BundleError(f"{directory} was written by a newer tlearn (format {version}); upgrade tlearn to load it")
    if version < OLDEST_FORMAT:
        raise BundleError(f"{directory} is an older tlearn model (format {version}, this tlearn reads "
                          f"{OLDEST_FORMAT} to {FORMAT_VERSION}): train it again with this version")


def _check_files(directory: Path, files) -> None:
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise BundleError(f"{directory / CONFIG_FILE} does not list the model's files and their SHA-256")
    for name, digest in files.items():
        path = directory / name
        if not isinstance(name, str) or ".." in Path(name).parts or Path(name).is_absolute():
            raise BundleError(f"{directory / CONFIG_FILE} lists a file outside the model folder: {name!r}")
        if not path.is_file():
            raise BundleError(f"{directory} is incomplete: {name} is missing")
        if file_sha256(path) != digest:
            raise BundleError(f"{path} has been changed or truncated since the model was written (its SHA-256 "
                              "does not match config.json): restore it or train again")


def _classes(value) -> list[str]:
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) and c for c in value):
        raise BundleError(f"classes must be a list of at least two non-empty names, not {value!r:.80}")
    if len(set(value)) != len(value):
        raise BundleError("classes has the same name twice")
    return list(value)


def _preprocessing(data) -> Preprocessing:
    prep = Preprocessing.from_dict(data)
    if not 16 <= prep.input_size <= 1024:
        raise BundleError(f"preprocessing input_size must be between 16 and 1024, not {prep.input_size}")
    if not 0.1 <= prep.crop_pct <= 1.0:
        raise BundleError(f"preprocessing crop_pct must be between 0.1 and 1, not {prep.crop_pct}")
    if prep.interpolation not in INTERPOLATIONS:
        raise BundleError(f"preprocessing interpolation must be one of {', '.join(INTERPOLATIONS)}, not "
                          f"{prep.interpolation!r}")
    if len(prep.mean) != 3 or len(prep.std) != 3 or not all(math.isfinite(v) for v in prep.mean + prep.std) \
            or min(prep.std) <= 0:
        raise BundleError(f"preprocessing mean and std must be 3 finite numbers each, std positive "
                          f"(mean {prep.mean}, std {prep.std})")
    return prep


def _split(value) -> dict:
    """The recorded split; its training images' content (tlearn.data.layout.trained_content) checked."""
    split = dict(value or {})
    content = split.get("train_content", [])
    if not isinstance(content, list) or not all(isinstance(c, str) and len(c) == 16 and
                                                all(ch in "0123456789abcdef" for ch in c) for c in content):
        raise BundleError("split.train_content must be a list of 16-digit lower-case hex strings (the training "
                          "images' content)")
    return split


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise BundleError(f"{name} must be true or false, not {value!r}")
    return value


def _temperature(value) -> float:
    low, high = TEMPERATURE_BOUNDS
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low * (1 - 1e-9) <= value <= high * (1 + 1e-9):
        raise BundleError(f"the calibration temperature must be a number between {low:g} and {high:g} (the range "
                          f"calibration searches), not {value!r:.40}: config.json was edited; restore it or train "
                          "again")
    return float(value)


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{path} is not a readable safetensors file ({exc})") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path.parent} is not a tlearn model folder: {path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path} does not hold a JSON object")
    return data


def _read_json_or_none(path: Path, key: str):
    try:
        return json.loads(path.read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _fill_buffers(model) -> None:
    """Buffers a state dict does not hold (none in timm's backbones so far) stay on the meta device after
    load_state_dict(assign=True): materialise them as zeros rather than fail later."""
    import torch

    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_meta:
                module.register_buffer(name, torch.zeros(buffer.shape, dtype=buffer.dtype))


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("tlearn", "torch", "timm", "numpy", "pillow", "onnxruntime", "openvino", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def known_architecture(architecture: str) -> bool:
    """Architecture names come from the registry only (a config naming "hf-hub:..." must not reach timm)."""
    return any(spec.architecture == architecture for spec in BACKBONES.values())
