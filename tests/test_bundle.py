import json

import pytest
import torch

import tlearn
from tlearn.bundle import Bundle, BundleError


def test_round_trip_predicts_the_same(demo_model, demo_data, tmp_path):
    folder = demo_model.save(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "metrics.json", "model.safetensors"]
    again = tlearn.load(folder)
    files = sorted((demo_data / "test").rglob("*.png"))[:5]
    a, b = demo_model.predict_proba(files), again.predict_proba(files)
    assert torch.allclose(torch.from_numpy(a), torch.from_numpy(b), atol=1e-6)
    assert again.classes_ == ["brick", "grass", "gravel"]


def test_config_records_how_the_model_was_made(demo_model, tmp_path):
    config = json.loads((demo_model.save(tmp_path / "m") / "config.json").read_text())
    assert config["backbone"]["name"] == "efficientnet_lite0"
    assert len(config["backbone"]["weights"]["sha256"]) == 64
    assert config["preprocessing"]["input_size"] == 224
    assert set(config["split"]["files"]) == {"train", "val", "test"}
    assert {"torch", "timm", "tlearn"} <= set(config["versions"])
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert set(metrics) == {"val", "test"}
    for key in ("accuracy", "mean_class_accuracy", "n", "per_class", "confusion_matrix"):
        assert key in metrics["test"]


def test_bundle_never_unpickles(demo_model, tmp_path, monkeypatch):
    folder = demo_model.save(tmp_path / "m")
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a bundle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    Bundle.load(folder).build_model()


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "config.json").unlink(), "config.json is missing"),
    (lambda f: (f / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\x80\x04garbage pickle"), "not a readable safetensors"),
    (lambda f: (f / "model.safetensors").unlink(), "no model.safetensors"),
])
def test_damaged_bundles_are_clear_errors(demo_model, tmp_path, damage, message):
    folder = demo_model.save(tmp_path / "m")
    damage(folder)
    with pytest.raises(BundleError, match=message):
        tlearn.load(folder)


def test_weights_of_another_architecture_are_refused(demo_model, tmp_path):
    folder = demo_model.save(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["backbone"]["architecture"] = "tf_efficientnet_lite2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="do not fit"):
        tlearn.load(folder).model()


def test_not_a_folder(tmp_path):
    with pytest.raises(BundleError, match="not a folder"):
        tlearn.load(tmp_path / "absent")
