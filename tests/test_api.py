import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import tlearn
from conftest import link_subset
from tlearn.cli import app
from tlearn.predict import Prediction, Unreadable

runner = CliRunner()


def test_demo_model_learns_the_textures(demo_model):
    assert demo_model.metrics_["test"]["accuracy"] >= 0.9
    assert demo_model.metrics_["val"]["n"] == 18
    assert demo_model.summary_["extracted"] + demo_model.summary_["from_cache"] == 84


def test_unfitted_classifier_says_what_to_do():
    with pytest.raises(tlearn.NotFittedError, match="fit"):
        tlearn.ImageClassifier().predict(["x.jpg"])


def test_predict_files_folders_and_unreadable(demo_model, demo_data, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    rows = demo_model.predict([demo_data / "test" / "grass", bad, tmp_path / "missing.png"], top_k=2)
    preds = [r for r in rows if isinstance(r, Prediction)]
    assert len(preds) == 6 and all(p.label == "grass" for p in preds)
    assert all(len(p.top) == 2 and p.top[0][1] >= p.top[1][1] for p in preds)
    assert sorted(Path(r.path).name for r in rows if isinstance(r, Unreadable)) == ["bad.jpg", "missing.png"]


def test_second_fit_uses_the_cache_and_gives_the_same_model(demo_model, demo_data, cache_dir):
    again = tlearn.ImageClassifier(cache_dir=cache_dir, progress=False).fit(demo_data)
    assert again.summary_["extracted"] == 0
    assert again.metrics_ == demo_model.metrics_


def test_retrain_on_cached_features_imports_no_torch_and_writes_the_same_model(demo_model, demo_data, cache_dir,
                                                                             tmp_path):
    """The head is numpy and the backbone's tensors are cached with its features: a re-train builds no network."""
    first = demo_model.save(tmp_path / "first")
    script = (f"import sys, tlearn\n"
              f"tlearn.ImageClassifier(cache_dir={str(cache_dir)!r}, progress=False).fit({str(demo_data)!r})"
              f".save({str(tmp_path / 'again')!r})\n"
              "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    again = tlearn.load(tmp_path / "again")
    assert again.metrics_ == demo_model.metrics_
    files = sorted((demo_data / "test").rglob("*.png"))[:3]
    assert (again.predict_proba(files) == demo_model.predict_proba(files)).all()


def test_prediction_with_an_exported_engine_imports_no_torch(demo_model, demo_data, cache_dir, tmp_path):
    """Once the backbone's engine is exported and verified (by training, in the feature cache), a loaded model
    predicts without building the network: numpy head, engine from its files; the same probabilities."""
    folder = demo_model.save(tmp_path / "model")
    files = sorted((demo_data / "test").rglob("*.png"))[:4]
    script = (f"import sys, json, tlearn\n"
              f"clf = tlearn.load({str(folder)!r}, cache_dir={str(cache_dir)!r})\n"
              f"proba = clf.predict_proba({[str(f) for f in files]!r})\n"
              "print(json.dumps([proba.tolist(), sorted(m for m in ('torch', 'timm') if m in sys.modules)]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    proba, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert heavy == []
    assert abs(np.array(proba) - demo_model.predict_proba(files)).max() < 1e-5


def test_cli_train_evaluate_predict_with_bad_files(hymenoptera_small, tmp_path, cache_dir):
    data = link_subset(hymenoptera_small, tmp_path / "data", {"train": 6, "val": 4})
    (data / "train/ants/truncated.jpg").write_bytes((hymenoptera_small / "train/ants").iterdir().__next__()
                                                    .read_bytes()[:300])
    (data / "train/bees/README.jpg").write_text("a text file with an image name")
    model = tmp_path / "model"
    result = runner.invoke(app, ["train", str(data), "--out", str(model), "--cache-dir", str(cache_dir), "-q"])
    assert result.exit_code == 0, result.output
    assert "val accuracy" in result.output and "skipped 2 unreadable" in result.output
    config = json.loads((model / "config.json").read_text())
    assert sorted(Path(s["path"]).name for s in config["training"]["skipped_files"]) == ["README.jpg", "truncated.jpg"]
    assert (data / "train/ants/truncated.jpg").exists()

    result = runner.invoke(app, ["evaluate", str(model), str(data), "--split", "val", "--json",
                                 "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 8 and metrics["accuracy"] == json.loads((model / "metrics.json").read_text())["val"]["accuracy"]

    result = runner.invoke(app, ["predict", str(model), str(data / "val"), str(data / "train/bees/README.jpg"),
                                 "--top-k", "2", "--format", "json"])
    assert result.exit_code == 1, result.output  # some input could not be read; the others are written
    out = json.loads(result.stdout)
    assert len(out["predictions"]) == 8 and {p["label"] for p in out["predictions"]} <= {"ants", "bees"}
    assert [Path(u["path"]).name for u in out["unreadable"]] == ["README.jpg"]

    result = runner.invoke(app, ["predict", str(model), str(data / "val" / "ants")])
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "path,label,score" and len(lines) == 5


def test_cli_errors_name_the_problem(tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "nowhere"), "-q"])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path), str(tmp_path)])
    assert result.exit_code == 2 and "config.json is missing" in result.output
    result = runner.invoke(app, ["train", str(tmp_path), "--backbone", "alexnet", "-q"])
    assert result.exit_code == 2 and "unknown backbone" in result.output


def test_backbones_command_lists_offline_weights():
    result = runner.invoke(app, ["backbones"])
    assert result.exit_code == 0
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        assert name in result.output
    assert "yes" in result.output


def test_console_script_runs_the_demo(tmp_path):
    """The installed `tlearn` entry point, in a real process, end to end on the built-in demo."""
    exe = Path(sys.executable).with_name("tlearn")
    env = {**os.environ, "TLEARN_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([str(exe), "demo", "--out", str(tmp_path / "demo")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout and "brick_00.png" in done.stdout
    assert (tmp_path / "demo" / "model" / "model.safetensors").is_file()
