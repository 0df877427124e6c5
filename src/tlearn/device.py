"""Where the network runs: one decision, made here, for training, extraction, prediction and fine-tuning.

`--device auto|cpu|cuda[:N]|mps|xla` (`device=` in the API). The CPU keeps its verified exported engines
(OpenVINO, onnxruntime); any other device runs the backbone through torch itself there (channels-last, autocast at
the asked precision), and fine-tuning through Lightning's matching accelerator. `auto` takes what the machine has.

What a machine has is found without importing torch where the answer is plainly no (no NVIDIA driver, not Apple
silicon, no torch_xla): a first train on a CPU machine must not pay torch's import to learn that, and `--device
cuda` there says so at once.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from tlearn.errors import InvalidParameter, TlearnError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps", "xla")
_NAME = re.compile(r"^(auto|cpu|mps|xla|cuda(:\d+)?)$")


class DeviceError(TlearnError):
    """The device asked for is not on this machine (or its software is missing)."""


@dataclass(frozen=True)
class DeviceChoice:
    """The device the network runs on, and why that one."""

    name: str  # cpu, cuda:N, mps or xla
    reason: str

    @property
    def is_cpu(self) -> bool:
        return self.name == "cpu"

    @property
    def accelerator(self) -> str:
        """Lightning's accelerator for this device."""
        return {"cpu": "cpu", "mps": "mps", "xla": "tpu"}.get(self.name, "gpu")

    @property
    def lightning_devices(self) -> str:
        """Lightning's devices argument: one device; "N," (that GPU's index) for a GPU other than the first."""
        index = self.name.split(":")[1] if self.name.startswith("cuda:") else "0"
        return "1" if index == "0" else f"{index},"

    def to_dict(self) -> dict:
        return {"name": self.name, "reason": self.reason}


def check_device(asked: str) -> str:
    """`asked` if it names a device kind tlearn knows (InvalidParameter otherwise); nothing is probed."""
    if not isinstance(asked, str) or not _NAME.match(asked):
        raise InvalidParameter(f"device must be one of {', '.join(DEVICES)}, not {asked!r}")
    return asked


def resolve_device(asked: str = "auto") -> DeviceChoice:
    """The device for `asked`, probed; DeviceError names what is missing when the machine lacks it."""
    asked = check_device(asked)
    if asked == "cpu":
        return DeviceChoice("cpu", "asked for")
    if asked.startswith("cuda"):
        return _cuda(asked, required=True)
    if asked == "mps":
        return _mps(required=True)
    if asked == "xla":
        return _xla(required=True)
    for probe in (_cuda, _mps, _xla):
        found = probe("cuda", required=False) if probe is _cuda else probe(required=False)
        if found is not None:
            return found
    return DeviceChoice("cpu", "auto: no GPU or TPU here (no NVIDIA driver, not Apple silicon, no TPU runtime)")


def nvidia_driver() -> bool:
    """Whether an NVIDIA driver is loaded (Linux: /proc/driver/nvidia; elsewhere: a device node)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    try:
        if gpus.is_dir() and any(gpus.iterdir()):
            return True
    except OSError:
        pass
    return any(Path("/dev").glob("nvidia[0-9]*")) or sys.platform == "win32" and bool(os.environ.get("CUDA_PATH"))


def _torch():
    if not _has_torch():
        raise DeviceError("running on a GPU or TPU needs torch: pip install 'tlearn[train]'")
    import torch

    return torch


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def _cuda(asked: str, required: bool) -> DeviceChoice | None:
    if not nvidia_driver():
        if required:
            raise DeviceError(f"--device {asked}: no CUDA GPU on this machine (no NVIDIA driver is loaded); use "
                              "--device cpu or auto")
        return None
    if not required and not _has_torch():  # the base install on a GPU machine: auto keeps the CPU's engines
        return None
    torch = _torch()
    if not torch.cuda.is_available():
        if required:
            cuda = torch.version.cuda or "none (a CPU build of torch)"
            raise DeviceError(f"--device {asked}: torch sees no usable CUDA GPU (torch {torch.__version__}, CUDA "
                              f"{cuda}); use --device cpu or auto")
        return None
    count = torch.cuda.device_count()
    index = int(asked.split(":")[1]) if ":" in asked else 0
    if index >= count:
        raise DeviceError(f"--device {asked}: this machine has {count} CUDA GPU(s) (cuda:0 .. cuda:{count - 1})")
    name = torch.cuda.get_device_name(index)
    return DeviceChoice(f"cuda:{index}", f"{'asked for' if required else 'auto'}: {name}")


def _mps(required: bool) -> DeviceChoice | None:
    if not (sys.platform == "darwin" and platform.machine() == "arm64"):
        if required:
            raise DeviceError("--device mps: Apple's Metal GPU needs a Mac with Apple silicon; use --device cpu or "
                              "auto")
        return None
    if not required and not _has_torch():
        return None
    torch = _torch()
    if not torch.backends.mps.is_available():
        if required:
            raise DeviceError("--device mps: torch reports Metal (MPS) unavailable on this Mac")
        return None
    return DeviceChoice("mps", f"{'asked for' if required else 'auto'}: Apple silicon GPU (Metal)")


def _xla(required: bool) -> DeviceChoice | None:
    if importlib.util.find_spec("torch_xla") is None:
        if required:
            raise DeviceError("--device xla: a TPU needs torch_xla, which is not installed (on a TPU machine: pip "
                              "install torch_xla, matching torch's version); use --device cpu or auto")
        return None
    if not required and os.environ.get("PJRT_DEVICE", "").upper() != "TPU" and not os.environ.get("COLAB_TPU_ADDR"):
        return None  # torch_xla installed, but no TPU runtime announced: auto does not gamble on it
    return DeviceChoice("xla", f"{'asked for' if required else 'auto'}: TPU through torch_xla")


def torch_device(choice: DeviceChoice):
    """The torch.device of `choice` (xla through torch_xla)."""
    torch = _torch()
    if choice.name == "xla":
        import torch_xla.core.xla_model as xm

        return xm.xla_device()
    return torch.device(choice.name)


def batch_size_for(choice: DeviceChoice, asked: int, per_image_bytes: int = 24 * 2**20, most: int = 512) -> int:
    """The extraction batch on `choice`: on a CUDA GPU as many images as half its free memory holds at
    `per_image_bytes` each (activations of a forward pass), at least the asked size, at most `most`; elsewhere
    the asked size."""
    if not choice.name.startswith("cuda"):
        return asked
    torch = _torch()
    free, _ = torch.cuda.mem_get_info(torch.device(choice.name))
    return max(asked, min(most, int(free // 2 // per_image_bytes)))
