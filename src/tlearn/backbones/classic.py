"""ImageNet weights for the classic backbones (VGG, ResNet, Inception): read a file, map its key layout to timm's,
find it in the local weights cache, or fetch it from the Hugging Face hub.

A weights file is a safetensors file or a PyTorch state dict (read with `weights_only=True`, never unpickled),
in timm's key layout or the layout the weights are usually published in (torchvision; Cadene's pretrainedmodels
for Inception-ResNet-v2). Only the hub download touches the network, and it gives up within seconds offline.
"""
from __future__ import annotations

import os
import pickle
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlparse

from tlearn.errors import TlearnError

if TYPE_CHECKING:  # torch and timm are imported where weights are read, not when the registry is (see registry.py)
    import torch
    from torch import nn

HUB_FILE = "model.safetensors"  # what timm publishes for each architecture on the hub
HUB_PROBE_SECONDS = 3.0  # huggingface_hub retries an unreachable host for ~25 s; we ask once, briefly
_TRUE = {"1", "on", "yes", "true"}


class WeightsFileError(TlearnError):
    """A weights file that cannot be read, or whose tensors do not fit the architecture; says which ones."""


class HubUnavailable(TlearnError):
    """The hub cannot be used now; the message says why and how to get the weights instead."""


# ---- key layouts -------------------------------------------------------------------------------------------
def drop_aux_logits(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision Inception-v3 -> timm: the auxiliary classifier is only used in training, timm builds none."""
    return {k: v for k, v in state_dict.items() if not k.startswith("AuxLogits.")}


def rename_last_linear(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """pretrainedmodels (Cadene) Inception-ResNet-v2 -> timm: same modules, the classifier is called `classif`."""
    return {("classif." + k.removeprefix("last_linear.")) if k.startswith("last_linear.") else k: v
            for k, v in state_dict.items()}


def vgg_torchvision_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision VGG -> timm: the classifier's fc6/fc7 become timm's pre_logits convolutions (timm's own mapping)."""
    from timm.models.vgg import _filter_fn

    return _filter_fn(state_dict)


def keep_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ResNet-50 keys are timm's already."""
    return state_dict


# ---- reading and loading -----------------------------------------------------------------------------------
def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a PyTorch state dict (optionally under "state_dict"/"model")."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from timm.models import clean_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            content = load_file(path)
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch state dict (.pth/.pt/.bin)"
        first_line = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise WeightsFileError(f"{path} is not a readable {kind} file: {first_line}") from None
    if isinstance(content, dict):  # training checkpoints keep the weights under one of these
        content = next((content[k] for k in ("state_dict", "model") if isinstance(content.get(k), dict)), content)
    if not isinstance(content, dict) or not content or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items()):
        raise WeightsFileError(f"{path} holds a {type(content).__name__}, not a state dict of named tensors; save "
                               "the weights with torch.save(model.state_dict(), ...) or safetensors")
    return clean_state_dict(content)  # drops DataParallel / torch.compile prefixes


def check_keys(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Raise WeightsFileError naming every missing, unexpected and wrongly shaped tensor (a few of each)."""
    expected = model.state_dict()
    problems = {
        "missing": [k for k in expected if k not in state],
        "unexpected": [k for k in state if k not in expected],
        "wrong shape": [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
                        for k, v in expected.items() if k in state and state[k].shape != v.shape],
    }
    found = {kind: names for kind, names in problems.items() if names}
    if found:
        detail = "; ".join(f"{len(names)} {kind}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                           for kind, names in found.items())
        raise WeightsFileError(f"{path} does not fit {type(model).__name__} "
                               f"(timm or torchvision key layout expected): {detail}")


def load_weights(model: nn.Module, path: Path, to_timm: Callable[[dict], dict] = keep_layout) -> None:
    """Load a weights file (timm or published layout) into a timm model built with its ImageNet head, strictly."""
    state = to_timm(read_state_dict(path))
    check_keys(model, state, path)
    model.load_state_dict(state, strict=True, assign=True)


# ---- where weights live ------------------------------------------------------------------------------------
def weights_dir() -> Path:
    """The local weights cache: $TLEARN_WEIGHTS, or ~/.cache/tlearn/weights."""
    return Path(os.environ.get("TLEARN_WEIGHTS") or Path.home() / ".cache" / "tlearn" / "weights").expanduser()


def hub_url(architecture: str) -> str:
    return f"{hub_endpoint()}/{_hub_id(architecture)}/resolve/main/{HUB_FILE}"


def cached_weights(name: str, architecture: str) -> Path | None:
    """<weights dir>/NAME.safetensors or NAME.pth, else timm's file in the Hugging Face cache; never the network."""
    for suffix in (".safetensors", ".pth"):
        path = weights_dir() / f"{name}{suffix}"
        if path.is_file():
            return path
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(_hub_id(architecture), HUB_FILE)
    return Path(found) if isinstance(found, str) else None


def how_to_get(name: str, architecture: str) -> str:
    return (f"download {hub_url(architecture)} and save it as {weights_dir() / name}.safetensors (a "
            f"torchvision-layout state dict saved as {name}.pth works too; set $TLEARN_WEIGHTS to use another "
            f"folder), or run `tlearn fetch-weights {name}` on a machine with network and copy that file here, "
            "or pass --weights FILE")


def fetch_weights(name: str, architecture: str) -> Path:
    """Download the hub weights into the weights cache and return the file; fail within seconds when offline."""
    from huggingface_hub import hf_hub_download

    offline = _hub_offline_reason()
    if offline:
        raise _unavailable(name, architecture, offline)
    target = weights_dir() / f"{name}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        try:
            downloaded = hf_hub_download(_hub_id(architecture), HUB_FILE, local_dir=scratch, etag_timeout=10)
        except Exception as exc:  # any hub/HTTP failure means the same to the user: no weights
            raise _unavailable(name, architecture, f"the download failed ({type(exc).__name__}: {exc})") from None
        shutil.move(downloaded, target)
    return target


def hub_endpoint() -> str:
    from huggingface_hub import constants as hub_constants

    return (os.environ.get("HF_ENDPOINT") or hub_constants.ENDPOINT).rstrip("/")


def _hub_id(architecture: str) -> str:
    import timm

    return timm.get_pretrained_cfg(architecture).hf_hub_id


def _hub_offline_reason() -> str | None:
    """Why the hub cannot be used now (None when it answers), decided in at most HUB_PROBE_SECONDS."""
    # Offline unless HF_HUB_OFFLINE=0 says otherwise: without network a hub lookup hangs ~50 s before failing.
    if os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() in _TRUE:
        return "offline mode is on (HF_HUB_OFFLINE=1, tlearn's default; set HF_HUB_OFFLINE=0 to allow downloads)"
    url = urlparse(hub_endpoint())
    if not _reachable(url.hostname or "", url.port or (80 if url.scheme == "http" else 443)):
        return f"{url.hostname} cannot be reached (no answer within {HUB_PROBE_SECONDS:g} s)"
    return None


def _reachable(host: str, port: int) -> bool:
    # getaddrinfo ignores socket timeouts, so the whole connect runs in a thread we stop waiting for.
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
            result.append(True)
        except OSError:
            result.append(False)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(HUB_PROBE_SECONDS)
    return bool(result and result[0])


def _unavailable(name: str, architecture: str, reason: str) -> HubUnavailable:
    return HubUnavailable(f"no ImageNet weights for {name} on this machine and the model hub cannot be used: "
                              f"{reason}. To get them: {how_to_get(name, architecture)}")
