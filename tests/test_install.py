"""The base install (no extras) predicts, evaluates and reports a model trained elsewhere, without torch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory) -> Path:
    """A fresh venv with `pip install tlearn` and nothing else (packages from PyPI; pip's cache keeps it quick)."""
    venv = tmp_path_factory.mktemp("base") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(ROOT)], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return venv


@pytest.mark.slow
def test_base_install_predicts_and_evaluates_without_torch(base_venv, demo_model, demo_data, tmp_path):
    model = demo_model.save(tmp_path / "model")
    python, tlearn = base_venv / "bin" / "python", base_venv / "bin" / "tlearn"
    env = {**os.environ, "TLEARN_CACHE": str(tmp_path / "cache")}
    files = sorted((demo_data / "test").rglob("*.png"))[:4]
    script = ("import importlib.util, json, sys, tlearn\n"
              f"predictor = tlearn.Predictor.load({str(model)!r})\n"
              f"rows = predictor.predict({[str(f) for f in files]!r})\n"
              f"heat = [predictor.explain(f) for f in {[str(f) for f in files]!r}]\n"
              "missing = [m for m in ('torch', 'timm', 'lightning', 'sklearn')"
              " if importlib.util.find_spec(m) is None]\n"
              "print(json.dumps([[r.label for r in rows], [e.label for e in heat], [list(e.heat.shape) for e in heat],"
              " missing, 'torch' in sys.modules]))\n")
    done = subprocess.run([str(python), "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    labels, explained, shapes, missing, imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert labels == explained == [r.label for r in demo_model.predict(files)]  # heat maps too, without torch
    assert shapes == [[Image.open(f).height, Image.open(f).width] for f in files]
    assert missing == ["torch", "timm", "lightning", "sklearn"] and not imported

    overlays = subprocess.run([str(tlearn), "explain", str(model), *map(str, files), "--out", str(tmp_path / "heat")],
                              capture_output=True, text=True, env=env, timeout=300)
    assert overlays.returncode == 0, overlays.stderr
    assert sorted(p.name for p in (tmp_path / "heat").iterdir()) == sorted(f"{f.stem}.heat.png" for f in files)

    evaluated = subprocess.run([str(tlearn), "evaluate", str(model), str(demo_data), "--json"], capture_output=True,
                               text=True, env=env, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] == demo_model.metrics_["test"]["accuracy"]

    trained = subprocess.run([str(tlearn), "train", str(demo_data), "--out", str(tmp_path / "m2")],
                             capture_output=True, text=True, env=env, timeout=300)
    assert trained.returncode == 2 and "pip install 'tlearn[train]'" in trained.stderr
