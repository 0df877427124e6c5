"""A trained model on disk: `model.safetensors` + `config.json` + `metrics.json`. The only module that knows it.

Nothing in a bundle is a pickle and loading one never unpickles: tensors come from safetensors, the rest is JSON.
Tensors are numpy arrays here; torch is imported only to build the network (`build_model`).
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from tlearn.backbones import Preprocessing
from tlearn.train.head import LinearHead

if TYPE_CHECKING:
    from tlearn.classifier import Classifier

FORMAT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE = "model.safetensors", "config.json", "metrics.json"


class BundleError(ValueError):
    """A folder that is not a usable tlearn model, with what is wrong with it."""


@dataclass
class Bundle:
    """Everything needed to predict, and to trace how the model was made."""

    classes: list[str]
    backbone: dict  # name, architecture, weights {source, sha256}, feature_dim, feature_key
    preprocessing: Preprocessing
    state: dict[str, np.ndarray]  # "backbone.*" and "head.*" tensors
    training: dict = field(default_factory=dict)  # recipe settings and what was chosen
    split: dict = field(default_factory=dict)  # the files of each split actually used
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # sections added by later stages (calibration, history, ...)

    def save(self, directory: str | Path) -> Path:
        """Write the bundle folder; each file is written to a temporary name first and renamed into place."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"format": "tlearn-bundle", "format_version": FORMAT_VERSION, "classes": self.classes,
                  "backbone": self.backbone, "preprocessing": self.preprocessing.to_dict(),
                  "training": self.training, "split": self.split, **self.extra,
                  "versions": _versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _atomic(directory / WEIGHTS_FILE, lambda tmp: save_file(
            {k: np.ascontiguousarray(v) for k, v in self.state.items()}, tmp, metadata={"format": "tlearn"}))
        _atomic(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=1)))
        _atomic(directory / METRICS_FILE, lambda tmp: Path(tmp).write_text(json.dumps(self.metrics, indent=1)))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Bundle":
        directory = Path(directory)
        if not directory.is_dir():
            raise BundleError(f"{directory} is not a folder; give the model folder written by `tlearn train`")
        config = _read_json(directory / CONFIG_FILE)
        if config.get("format") != "tlearn-bundle":
            raise BundleError(f"{directory / CONFIG_FILE} is not a tlearn model config")
        if config.get("format_version", 0) > FORMAT_VERSION:
            raise BundleError(f"{directory} was written by a newer tlearn (format {config['format_version']}); "
                              "upgrade tlearn to load it")
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise BundleError(f"{directory} has no {WEIGHTS_FILE}")
        try:
            state = load_file(weights)
        except (SafetensorError, OSError, ValueError) as exc:
            raise BundleError(f"{weights} is not a readable safetensors file ({exc})") from None
        metrics = _read_json(directory / METRICS_FILE) if (directory / METRICS_FILE).exists() else {}
        known = {"format", "format_version", "classes", "backbone", "preprocessing", "training", "split",
                 "versions", "created"}
        try:
            return cls(list(config["classes"]), dict(config["backbone"]),
                       Preprocessing.from_dict(config["preprocessing"]), state, config.get("training", {}),
                       config.get("split", {}), metrics, {k: v for k, v in config.items() if k not in known})
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{directory / CONFIG_FILE} is incomplete or malformed ({exc!r})") from None

    def temperature(self) -> float:
        """The calibration temperature (config "calibration"); 1 when there is none."""
        temperature = float(self.extra.get("calibration", {}).get("temperature", 1.0))
        if temperature <= 0:
            raise BundleError(f"calibration temperature must be positive, not {temperature}")
        return temperature

    def head(self, calibrated: bool = False) -> LinearHead:
        """The linear head on pooled backbone features (numpy, no torch): logits as it was trained, or divided by
        the calibration temperature (`calibrated`, what predictions use)."""
        scale = self.temperature() if calibrated else 1.0
        return LinearHead(self.state["head.weight"] / scale, self.state["head.bias"] / scale)

    def backbone_state(self) -> dict[str, np.ndarray]:
        """The backbone's tensors under the backbone network's own names."""
        return {k.removeprefix("backbone."): v for k, v in self.state.items() if k.startswith("backbone.")}

    def split_files(self, split: str) -> list[Path]:
        """The files of `split` the model was trained with, if they are all still where they were; else []."""
        root = self.extra.get("data_checks", {}).get("root")
        files = [Path(root) / relative for relative, _ in self.split.get("files", {}).get(split, [])] if root else []
        return files if files and all(f.is_file() for f in files) else []

    def build_model(self) -> Classifier:
        """The classifier with the bundle's weights, in eval mode; no network, no weights package needed.

        A calibration temperature T (config "calibration") is folded into the head: logits / T, same argmax."""
        import timm
        import torch
        from torch import nn

        from tlearn.classifier import Classifier

        backbone = timm.create_model(self.backbone["architecture"], pretrained=False, num_classes=0)
        n_features, n_classes = self.state["head.weight"].shape[1], len(self.classes)
        model = Classifier(backbone, nn.Linear(n_features, n_classes))
        try:
            model.load_state_dict({k: torch.from_numpy(v) for k, v in self.state.items()}, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"model weights do not fit the {self.backbone['architecture']} architecture: "
                              f"{str(exc).splitlines()[0]} ...") from None
        temperature = self.temperature()
        with torch.no_grad():
            model.head.weight /= temperature
            model.head.bias /= temperature
        return model.eval()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path.parent} is not a tlearn model folder: {path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path} does not hold a JSON object")
    return data


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("tlearn", "torch", "torchvision", "timm", "numpy", "pillow", "scikit-learn", "safetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions
