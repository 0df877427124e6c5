"""One device decision (tlearn.device): what this machine has, and a clear refusal of what it lacks."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tlearn.device import DeviceChoice, DeviceError, batch_size_for, check_device, resolve_device
from tlearn.errors import InvalidParameter

TLEARN = str(Path(sys.executable).with_name("tlearn"))


def test_auto_picks_the_cpu_here_without_importing_torch():
    script = ("import sys\nfrom tlearn.device import resolve_device\nchoice = resolve_device('auto')\n"
              "print(choice.name, 'torch' in sys.modules)\nprint(choice.reason)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    first, reason = done.stdout.strip().splitlines()
    assert first == "cpu False" and "no GPU" in reason


@pytest.mark.parametrize("asked, message", [("cuda", "no CUDA GPU on this machine"),
                                            ("cuda:1", "no CUDA GPU on this machine"),
                                            ("mps", "Apple silicon"), ("xla", "torch_xla")])
def test_a_device_this_machine_lacks_is_refused_by_name(asked, message):
    with pytest.raises(DeviceError, match=message):
        resolve_device(asked)


@pytest.mark.parametrize("asked", ["gpu", "cuda:", "cuda:x", "CPU", "", "tpu"])
def test_device_names_are_checked(asked):
    with pytest.raises(InvalidParameter, match="device must be one of"):
        check_device(asked)


def test_cli_train_with_a_missing_gpu_is_one_line_and_exit_2(tmp_path, demo_data, demo_model_dir):
    done = subprocess.run([TLEARN, "train", str(demo_data), "--out", str(tmp_path / "m"),
                           "--device", "cuda"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: --device cuda: no CUDA GPU on this machine (no NVIDIA driver "
                                                "is loaded); use --device cpu or auto"]
    assert not (tmp_path / "m").exists()
    out = tmp_path / "p.csv"
    predicted = subprocess.run([TLEARN, "predict", str(demo_model_dir), str(demo_data), "--device", "mps", "--output",
                                str(out)], capture_output=True, text=True)
    assert predicted.returncode == 2 and "--device mps: Apple's Metal GPU needs a Mac" in predicted.stderr
    assert not out.exists()


def test_the_choice_is_recorded_in_the_model(demo_model):
    assert demo_model.metrics_["device"]["name"] == "cpu"
    assert demo_model.bundle_.training["device"] == demo_model.summary_.device == demo_model.metrics_["device"]
    assert demo_model.bundle_.training["device_asked"] == "auto"


def test_cpu_device_keeps_the_batch_and_the_lightning_mapping():
    assert batch_size_for(DeviceChoice("cpu", "x"), 32) == 32
    assert DeviceChoice("cuda:0", "x").lightning_devices == "1"
    assert DeviceChoice("cuda:2", "x").lightning_devices == "2,"
    assert DeviceChoice("cuda:0", "x").accelerator == "gpu" and DeviceChoice("xla", "x").accelerator == "tpu"


def test_the_torch_engine_on_an_explicit_cpu_device_gives_the_reference_features(demo_model, demo_data):
    import torch

    from tlearn.engines import PixelsToOutputs, TorchEngine

    bundle = demo_model.bundle_
    pixels, features = bundle.reference()
    engine = TorchEngine(PixelsToOutputs(bundle.build_model().backbone, bundle.preprocessing), "fp32",
                         torch.device("cpu"))
    assert np.abs(engine(pixels) - features).max() < 1e-3


def test_auto_keeps_the_cpu_on_a_gpu_machine_without_torch(monkeypatch):
    """The base install (no torch) on a machine with an NVIDIA driver: auto keeps the CPU's engines, and only an
    explicit --device cuda asks for torch."""
    import tlearn.device as device

    monkeypatch.setattr(device, "nvidia_driver", lambda: True)
    monkeypatch.setattr(device, "_has_torch", lambda: False)
    assert resolve_device("auto").name == "cpu"
    with pytest.raises(DeviceError, match="needs torch"):
        resolve_device("cuda")
