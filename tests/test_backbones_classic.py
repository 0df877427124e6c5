"""The classic backbones (VGG16/19, ResNet50, InceptionV3, InceptionResNetV2) end to end, with random weights.

No network here, so each architecture gets random weights written the way they are published (torchvision's
layout; Cadene's pretrainedmodels layout for Inception-ResNet-v2) and in timm's layout; the published one must
give the same features as the network it came from, and a model trained on the timm-layout file must predict
and reload. The images are a tiny real subset (2 classes of the demo photos) to keep the big nets affordable.
"""
from __future__ import annotations

import json
import pickle
import shutil
import time
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tlearn
import tlearn.api
from tlearn.backbones import WeightsUnavailable, create_backbone, get_spec, parameter_count
from tlearn.backbones.classic import WeightsFileError
from tlearn.backbones.registry import file_sha256
from tlearn.cli import app
from tlearn.data.demo import make_demo_dataset

CLASSIC = ("vgg16", "vgg19", "resnet50", "inception_v3", "inception_resnet_v2")
INPUT_SIZE = {"vgg16": 224, "vgg19": 224, "resnet50": 224, "inception_v3": 299, "inception_resnet_v2": 299}
FEATURE_DIM = {"vgg16": 4096, "vgg19": 4096, "resnet50": 2048, "inception_v3": 2048, "inception_resnet_v2": 1536}
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Two train images (cross-validation needs two per class), one val and one test image of each of two demo
    classes (real photo crops)."""
    demo = make_demo_dataset(tmp_path_factory.mktemp("demo"))
    root = tmp_path_factory.mktemp("tiny")
    for split in ("train", "val", "test"):
        for cls in ("brick", "grass"):
            (root / split / cls).mkdir(parents=True)
            for src in sorted((demo / split / cls).iterdir())[:2 if split == "train" else 1]:
                shutil.copy(src, root / split / cls / src.name)
    return root


@pytest.fixture
def scratch(tmp_path):
    """tmp_path, emptied afterwards: the big nets leave ~1.5 GB of weights and bundles there."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture
def no_local_weights(tmp_path, monkeypatch):
    """An empty tlearn weights cache and an empty Hugging Face cache."""
    monkeypatch.setenv("TLEARN_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "weights"


def published_weights(name: str, folder: Path) -> tuple[torch.nn.Module, Path]:
    """Random weights saved in the layout they are published in, and the network (as feature extractor) they
    came from."""
    if name == "inception_resnet_v2":  # no torchvision model: pretrainedmodels calls the classifier last_linear
        source = timm.create_model(get_spec(name).architecture, pretrained=False)
        state = {k.replace("classif.", "last_linear."): v for k, v in source.state_dict().items()}
        source.reset_classifier(0)
    else:
        build = {"vgg16": torchvision.models.vgg16, "vgg19": torchvision.models.vgg19,
                 "resnet50": torchvision.models.resnet50,
                 "inception_v3": lambda weights: torchvision.models.inception_v3(
                     weights=weights, aux_logits=True, init_weights=False)}[name]
        source = build(weights=None)
        state = source.state_dict()
        if name.startswith("vgg"):
            source.classifier = source.classifier[:-1]  # fc7 output, as timm's pre_logits
        else:
            source.fc = torch.nn.Identity()
    path = folder / f"{name}-published.pth"
    torch.save(state, path)
    return source.eval(), path


def native_input(name: str) -> torch.Tensor:
    size = INPUT_SIZE[name]
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIC)
def test_train_predict_reload_with_weights_files(name, tiny_data, scratch, monkeypatch):
    tmp_path = scratch
    source, published = published_weights(name, tmp_path)
    x = native_input(name)
    with torch.no_grad():
        expected = source(x)
    del source

    # The published layout maps onto timm's: same features as the network the file came from.
    full, info = create_backbone(name, published, imagenet_head=True)
    assert (info.origin, info.source, info.sha256) == ("file", str(published), file_sha256(published))
    timm_layout = tmp_path / f"{name}-timm.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, timm_layout)
    full.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(full(x), expected, rtol=1e-4, atol=1e-4)
    del full
    published.unlink()

    # Train from the timm-layout file, recording what reaches the backbone.
    shapes: list[tuple[int, ...]] = []

    def create_and_watch(*args, **kwargs):
        model, weights_info = create_backbone(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: shapes.append(tuple(inputs[0].shape)))
        return model, weights_info

    monkeypatch.setattr(tlearn.backbones, "create_backbone", create_and_watch)
    model_dir = tmp_path / "model"
    result = runner.invoke(app, ["train", str(tiny_data), "--backbone", name, "--weights", str(timm_layout),
                                 "--out", str(model_dir), "--cache-dir", str(tmp_path / "cache"), "--quiet",
                                 "--engine", "torch"])  # eager torch: the hook sees every batch (engines: own tests)
    assert result.exit_code == 0, result.output
    size = INPUT_SIZE[name]
    assert shapes and all(s[1:] == (3, size, size) for s in shapes)
    assert sum(s[0] for s in shapes) >= 8  # the 8 images, then the engine shipped in the model folder is exported
    config = json.loads((model_dir / "config.json").read_text())
    assert config["preprocessing"]["input_size"] == size
    assert config["backbone"]["architecture"] == get_spec(name).architecture
    assert config["backbone"]["feature_dim"] == FEATURE_DIM[name]
    assert config["backbone"]["weights"] == {"source": str(timm_layout), "sha256": file_sha256(timm_layout),
                                             "origin": "file"}

    predicted = runner.invoke(app, ["predict", str(model_dir), str(tiny_data / "test"), "--format", "json",
                                    "--top-k", "2", "--engine", "torch"])
    assert predicted.exit_code == 0, predicted.output
    rows = json.loads(predicted.stdout)["predictions"]
    assert len(rows) == 2 and {r["label"] for r in rows} <= {"brick", "grass"}

    # Reloaded, the model carries the given weights (not a fresh init) and predicts what the CLI printed.
    reloaded = tlearn.load(model_dir, progress=False, engine="torch")
    given = load_file(timm_layout)
    for key, tensor in reloaded.bundle_.build_model().backbone.state_dict().items():
        assert torch.equal(tensor, given[key]), key
    proba = reloaded.predict_proba([r["path"] for r in rows])
    for row, p in zip(rows, proba):
        assert p[reloaded.classes_.index(row["label"])] == pytest.approx(row["score"], abs=1e-5)


def test_registry_rows_follow_the_timm_weights_config():
    for name in CLASSIC:
        spec = get_spec(name)
        cfg = timm.get_pretrained_cfg(spec.architecture)
        pre = spec.preprocessing
        assert pre.input_size == INPUT_SIZE[name] == cfg.input_size[-1]
        assert (pre.interpolation, pre.crop_pct, pre.mean, pre.std) == (cfg.interpolation, cfg.crop_pct,
                                                                        tuple(cfg.mean), tuple(cfg.std))
        with torch.device("meta"):
            model = timm.create_model(spec.architecture)
        for module in spec.unfreeze_hint.split(","):
            assert any(p.numel() for p in model.get_submodule(module).parameters()), (name, module)
    assert get_spec("resnet50").architecture == "resnet50.tv_in1k"  # torchvision-compatible keys and preprocessing


def test_local_cache_is_found_and_listed(no_local_weights, tmp_path):
    no_local_weights.mkdir()
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), no_local_weights / "resnet50.pth")
    _, info = create_backbone("resnet50")
    assert (info.origin, info.source) == ("cache", str(no_local_weights / "resnet50.pth"))

    listed = runner.invoke(app, ["backbones"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line for line in listed.stdout.splitlines() if line.strip() and "px" in line}
    assert "yes" in rows["resnet50"] and "25.6M" in rows["resnet50"]
    assert "no" in rows["vgg16"] and "138.4M" in rows["vgg16"] and "224px" in rows["vgg16"]
    assert "299px" in rows["inception_v3"] and "299px" in rows["inception_resnet_v2"]
    assert parameter_count("vgg19") == sum(p.numel() for p in torchvision.models.vgg19(weights=None).parameters())


def test_offline_without_weights_fails_fast_and_says_how_to_get_them(no_local_weights, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as error:
        create_backbone("vgg16")
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert "HF_HUB_OFFLINE" in message and "tlearn fetch-weights vgg16" in message
    assert str(no_local_weights / "vgg16.safetensors") in message
    assert "huggingface.co/timm/vgg16.tv_in1k/resolve/main/model.safetensors" in message

    fetched = runner.invoke(app, ["fetch-weights", "inception_v3"], env={"COLUMNS": "1000"})
    assert fetched.exit_code == 2 and str(no_local_weights / "inception_v3.safetensors") in fetched.output
    assert not no_local_weights.exists() or not any(no_local_weights.iterdir())


def test_unreachable_hub_fails_fast(no_local_weights, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://192.0.2.1")  # TEST-NET-1: never routed anywhere
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="192.0.2.1 cannot be reached"):
        create_backbone("inception_resnet_v2")
    assert time.perf_counter() - start < 5


class _WritesAFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_bad_weights_files_get_clear_errors(tmp_path):
    not_safetensors = tmp_path / "notes.safetensors"
    not_safetensors.write_text("these are not weights")
    with pytest.raises(WeightsFileError, match="notes.safetensors is not a readable safetensors file"):
        create_backbone("resnet50", not_safetensors)

    a_list = tmp_path / "list.pth"
    torch.save([1, 2, 3], a_list)
    with pytest.raises(WeightsFileError, match="holds a list, not a state dict"):
        create_backbone("resnet50", a_list)

    marker = tmp_path / "unpickled"
    hostile = tmp_path / "hostile.pth"
    with open(hostile, "wb") as handle:
        pickle.dump(_WritesAFileWhenUnpickled(marker), handle, protocol=2)
    with pytest.raises(WeightsFileError, match="hostile.pth is not a readable PyTorch state dict"):
        create_backbone("resnet50", hostile)
    assert not marker.exists()

    with pytest.raises(WeightsUnavailable, match="missing.pth for resnet50 does not exist"):
        create_backbone("resnet50", tmp_path / "missing.pth")


def test_mismatched_weights_are_reported_by_name(tmp_path, tiny_data):
    state = torchvision.models.resnet50(weights=None).state_dict()
    del state["fc.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(WeightsFileError) as error:
        create_backbone("resnet50", path)
    message = str(error.value)
    assert "1 missing: fc.weight" in message and "1 unexpected: layer5.0.conv1.weight" in message
    assert "conv1.weight (64, 3, 3, 3) (expected (64, 3, 7, 7))" in message

    result = runner.invoke(app, ["train", str(tiny_data), "--backbone", "resnet50", "--weights", str(path),
                                 "--out", str(tmp_path / "model"), "--quiet"], env={"COLUMNS": "1000"})
    assert result.exit_code == 2 and "fc.weight" in result.output and not (tmp_path / "model").exists()

