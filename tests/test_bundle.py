import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import tlearn
from tlearn.bundle import Bundle, BundleError, file_sha256


def test_round_trip_predicts_the_same(demo_model, demo_data, tmp_path):
    folder = demo_model.save(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "engine", "metrics.json", "model.safetensors",
                                                        "out_of_fold.csv", "report"]
    assert sorted(p.name for p in (folder / "engine").iterdir()) == ["backbone.onnx", "feature-map.onnx",
                                                                   "reference.safetensors"]
    again = tlearn.load(folder)
    files = sorted((demo_data / "test").rglob("*.png"))[:5]
    a, b = demo_model.predict_proba(files), again.predict_proba(files)
    assert np.allclose(a, b, atol=1e-6)
    assert again.classes_ == ["brick", "grass", "gravel"]


def test_config_records_how_the_model_was_made(demo_model, tmp_path):
    config = json.loads((demo_model.save(tmp_path / "m") / "config.json").read_text())
    assert config["format_version"] == 2
    assert config["backbone"]["name"] == "efficientnet_lite0"
    assert len(config["backbone"]["weights"]["sha256"]) == 64
    assert config["preprocessing"]["input_size"] == 224
    assert set(config["split"]["files"]) == {"train", "val", "test"}
    assert {"tlearn", "numpy"} <= set(config["versions"])
    assert set(config["files"]) == {"model.safetensors", "metrics.json", "engine/backbone.onnx",
                                    "engine/reference.safetensors", "out_of_fold.csv", "engine/feature-map.onnx"}
    for name, digest in config["files"].items():
        assert file_sha256(tmp_path / "m" / name) == digest
    assert any(v["ok"] for v in config["engine"]["verdicts"].values())
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert set(metrics) == {"val", "test", "leaks", "cv", "device"} and metrics["leaks"]["count"] == 0
    assert metrics["device"] == config["training"]["device"] and metrics["device"]["name"] == "cpu"
    assert metrics["cv"]["n"] == len(config["split"]["files"]["train"])  # out of fold on every training image
    assert "-fold stratified cross-validation on train" in config["training"]["head"]["chosen_by"]
    assert config["training"]["head"]["refit"] == f"all {metrics['cv']['n']} training images"
    for key in ("accuracy", "mean_class_accuracy", "n", "per_class", "confusion_matrix"):
        assert key in metrics["test"]
    assert oct(os.stat(tmp_path / "m" / "model.safetensors").st_mode & 0o777) == "0o644"


def test_bundle_never_unpickles(demo_model, tmp_path, monkeypatch):
    folder = demo_model.save(tmp_path / "m")
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a bundle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    Bundle.load(folder).build_model()


def _edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def _flip_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "config.json").unlink(), "config.json is missing"),
    (lambda f: (f / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\x80\x04garbage pickle"), "model.safetensors has been changed"),
    (lambda f: (f / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda f: _flip_byte(f / "model.safetensors"), "model.safetensors has been changed"),
    (lambda f: _flip_byte(f / "engine" / "backbone.onnx"), "backbone.onnx has been changed"),
    (lambda f: (f / "metrics.json").write_text("{}"), "metrics.json has been changed"),
    (lambda f: _edit_config(f, lambda c: c.update(format_version="1")), "format_version must be a whole number"),
    (lambda f: _edit_config(f, lambda c: c.update(format_version=None)), "format_version must be a whole number"),
    (lambda f: _edit_config(f, lambda c: c.update(format_version=1)), "older tlearn model"),
    (lambda f: _edit_config(f, lambda c: c.update(format_version=99)), "newer tlearn"),
    (lambda f: _edit_config(f, lambda c: c.update(temperature=float("nan"))), "temperature"),
    (lambda f: _edit_config(f, lambda c: c.update(temperature=-1)), "temperature"),
    (lambda f: _edit_config(f, lambda c: c.update(classes="abc")), "classes must be a list"),
    (lambda f: _edit_config(f, lambda c: c.update(classes=["a", "b"])), "the head is"),
    (lambda f: _edit_config(f, lambda c: c.update(classes=["a", "a", "b"])), "same name twice"),
    (lambda f: _edit_config(f, lambda c: c["preprocessing"].update(std=[0, 0, 0])), "std positive"),
    (lambda f: _edit_config(f, lambda c: c["preprocessing"].update(mean=[0.5, 0.5])), "mean and std"),
    (lambda f: _edit_config(f, lambda c: c["preprocessing"].update(input_size=100000)), "input_size"),
    (lambda f: _edit_config(f, lambda c: c["preprocessing"].update(input_size=0)), "input_size"),
    (lambda f: _edit_config(f, lambda c: c["preprocessing"].update(crop_pct=0)), "crop_pct"),
    (lambda f: _edit_config(f, lambda c: c["preprocessing"].update(interpolation="lanczos9")), "interpolation"),
    (lambda f: _edit_config(f, lambda c: c["backbone"].update(architecture="hf-hub:evil/model")), "architecture"),
    (lambda f: _edit_config(f, lambda c: c["files"].update({"../../etc/passwd": "0"})), "outside the model folder"),
    (lambda f: _edit_config(f, lambda c: c.pop("files")), "does not list the model's files"),
])
def test_damaged_bundles_are_clear_errors(demo_model, tmp_path, damage, message):
    folder = demo_model.save(tmp_path / "m")
    damage(folder)
    with pytest.raises(BundleError, match=message):
        tlearn.Predictor.load(folder)


def test_weights_of_another_architecture_are_refused(demo_model, tmp_path):
    folder = demo_model.save(tmp_path / "m")
    _edit_config(folder, lambda c: c["backbone"].update(architecture="tf_efficientnet_lite2"))
    with pytest.raises(BundleError, match="do not fit"):
        Bundle.load(folder).build_model()


def test_not_a_folder(tmp_path):
    with pytest.raises(BundleError, match="not a folder"):
        tlearn.load(tmp_path / "absent")


def test_retrain_into_a_model_folder_replaces_every_file(demo_model, demo_data, cache_dir, tmp_path):
    folder = demo_model.save(tmp_path / "m")
    stale = [folder / "model.onnx", folder / "engine" / "stale.bin", folder / "report" / "old.png"]
    for path in stale:
        path.write_bytes(b"from the previous model")
    demo_model.save(folder)
    assert not any(p.exists() for p in stale)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]  # no staging folder left behind
    tlearn.Predictor.load(folder)


def test_a_folder_that_is_not_a_model_is_never_replaced(demo_model, tmp_path):
    mine = tmp_path / "my-photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(BundleError, match="not a tlearn model"):
        demo_model.save(mine)
    assert (mine / "holiday.jpg").read_bytes() == b"precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="is a file"):
        demo_model.save(tmp_path / "file")


@pytest.mark.slow
def test_kill_during_the_final_write_leaves_the_old_or_the_new_model(demo_model, tmp_path):
    """kill -9 at random moments of saving over an existing model: the folder is always one whole model."""
    old = demo_model.save(tmp_path / "m")
    old_config = (old / "config.json").read_text()
    script = ("import sys, tlearn\n"
              f"clf = tlearn.load({str(old)!r})\n"
              "clf.bundle_.temperature = 0.5\n"  # a different model, so old and new can be told apart
              f"clf.save({str(old)!r}, report=False)\n")
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(20):
        child = subprocess.Popen([sys.executable, "-c", script])
        time.sleep(float(rng.uniform(0.6, 2.0)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        bundle = Bundle.load(old)  # checks every file against the config: a mix fails here
        seen.add("old" if (old / "config.json").read_text() == old_config else "new")
        assert bundle.temperature in (demo_model.bundle_.temperature, 0.5)
    assert seen  # at least one outcome observed; both usually are


def test_model_folder_may_be_read_only(demo_model, demo_data, tmp_path):
    folder = demo_model.save(tmp_path / "m")
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    try:
        rows = tlearn.Predictor.load(folder).predict(sorted((demo_data / "test").rglob("*.png"))[:2])
        assert all(r.label in ("brick", "grass", "gravel") for r in rows)
        assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before  # nothing written (root could)
    finally:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
