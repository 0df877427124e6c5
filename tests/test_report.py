"""Calibration in the bundle and in predict, the train-time data check, and the HTML report in a real Chromium."""
from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import tlearn
from chromium_page import ChromiumMissing, chromium_binary, render
from tlearn.cli import app
from tlearn.evaluate.report import ReportInputs, write_report

runner = CliRunner()


@pytest.fixture(scope="module")
def saved_model(demo_model, tmp_path_factory) -> Path:
    return demo_model.save(tmp_path_factory.mktemp("model") / "demo-model")


@pytest.fixture(scope="session")
def chromium() -> str:
    try:
        return chromium_binary()
    except ChromiumMissing as exc:  # a failure, not a skip: `make test` installs it (`make browser`)
        pytest.fail(str(exc))


def test_fit_records_calibration_and_data_checks(demo_model):
    calibration = demo_model.bundle_.extra["calibration"]
    # the temperature is fitted on out-of-fold train probabilities: val and test only report
    assert calibration["fitted_on"] == "out-of-fold train" and calibration["temperature"] > 0
    assert set(calibration["ece_before"]) == {"out-of-fold train", "val", "test"}
    checks = demo_model.bundle_.extra["data_checks"]
    assert checks["errors"] == 0 and checks["files_checked"] == 84
    assert checks["root"] == demo_model.summary_.data


def test_predict_applies_the_saved_temperature(saved_model, demo_data, cache_dir):
    clf = tlearn.load(saved_model, cache_dir=cache_dir, progress=False)
    clf.bundle_.temperature = 3.0  # a clearly non-trivial temperature
    val = clf.scored_splits(demo_data, splits=("val",))["val"]
    proba = clf.predict_proba(val.paths)
    assert np.allclose(proba, val.proba(3.0), atol=2e-3)
    assert not np.allclose(proba, val.proba(1.0), atol=2e-3)
    assert (proba.argmax(1) == val.logits.argmax(1)).all()


def test_min_confidence_labels_unsure_images_uncertain(saved_model, demo_data):
    clf = tlearn.load(saved_model, progress=False)
    scores = sorted(p.score for p in clf.predict([demo_data / "test"]))
    threshold = scores[len(scores) // 2]
    rows = clf.predict([demo_data / "test"], min_confidence=threshold)
    for row in rows:
        assert row.uncertain == (row.score < threshold)
        assert (row.label == "uncertain") == row.uncertain
    result = runner.invoke(app, ["predict", str(saved_model), str(demo_data / "test"), "--min-confidence",
                                 str(scores[-1])])
    assert result.exit_code == 0
    labels = [r["label"] for r in csv.DictReader(io.StringIO(result.stdout))]
    assert labels.count("uncertain") == sum(s < scores[-1] for s in scores)
    assert runner.invoke(app, ["predict", str(saved_model), str(demo_data), "--min-confidence", "1.5"]).exit_code != 0


def test_train_warns_loudly_about_leakage(demo_data, tmp_path, cache_dir):
    data = Path(shutil.copytree(demo_data, tmp_path / "data"))
    shutil.copy(data / "train/grass/grass_00.png", data / "test/grass/leaked.png")
    result = runner.invoke(app, ["train", str(data), "--out", str(tmp_path / "model"), "--cache-dir",
                                 str(cache_dir), "-q"])
    assert result.exit_code == 0
    assert "WARNING" in result.stderr and "leakage" in result.stderr
    page = (tmp_path / "model" / "report" / "report.html").read_text()
    assert "corrupt the evaluation" in page and "leaked.png" in page


@pytest.mark.slow
def test_report_renders_in_chromium_with_every_image_loaded(demo_model, tmp_path, chromium):
    html = demo_model.report(tmp_path / "report")
    for name in ("confusion_counts.png", "confusion_normalised.png", "per_class.png", "reliability.png",
                 "coverage.png"):
        assert (html.parent / name).is_file()
    screenshot = tmp_path / "report.png"
    images = render(html, screenshot, chromium)
    assert len(images) >= 5
    assert [i for i in images if not (i["complete"] and i["width"] > 0)] == []
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=float)
    assert pixels.shape[0] > 1000 and pixels.std() > 20  # a long page with content, not a blank one


@pytest.mark.slow
def test_report_command_with_training_curves_and_mistakes(saved_model, demo_data, demo_model, tmp_path, chromium,
                                                          cache_dir):
    result = runner.invoke(app, ["report", str(saved_model), str(demo_data), "--out", str(tmp_path / "r"),
                                 "--cache-dir", str(cache_dir), "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "report.html").is_file()
    # a model with per-epoch history and some confident mistakes: curves and thumbnails are drawn and load
    scored = demo_model.scored_splits()
    wrong = scored["test"]
    wrong.labels = (wrong.labels + 1) % 3  # every test image now a mistake
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_accuracy": 1 - 0.3 / e, "lr": 1e-3}
               for e in range(1, 6)]
    html = write_report(tmp_path / "h", ReportInputs(demo_model.classes_, {"val": scored["val"], "test": wrong},
                                                      history=history, calibration={"temperature": 1.0}))
    assert (tmp_path / "h" / "training_curves.png").is_file()
    assert len(list((tmp_path / "h" / "gallery").glob("*.jpg"))) == 12
    images = render(html, tmp_path / "h.png", chromium)
    assert [i["src"] for i in images if not i["width"]] == []
    assert sum(i["src"].startswith("gallery/") for i in images) == 12


def test_report_modules_import_nothing_heavy():
    # `tlearn train` writes the report on every run, including a re-train on cached features that must stay fast:
    # the report modules themselves load matplotlib, never torch, timm, scikit-learn or scipy (those come lazily,
    # only where used). The package __init__ (the API) is skipped, so this checks the report's own imports.
    code = ("import sys, types\n"
            f"package = types.ModuleType('tlearn'); package.__path__ = [{str(Path(tlearn.__file__).parent)!r}]\n"
            "sys.modules['tlearn'] = package\n"
            "import tlearn.evaluate.report, tlearn.evaluate.calibration\n"
            "print(*(m for m in ('torch', 'timm', 'sklearn', 'scipy', 'matplotlib.pyplot') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == []


def test_train_warns_about_near_duplicates_across_given_splits(demo_data, tmp_path, cache_dir):
    """A given split that leaks (the same photo in train and val): train says so with an example, metrics.json
    counts it."""
    import shutil

    data = shutil.copytree(demo_data, tmp_path / "data")
    shutil.copy(data / "train" / "brick" / "brick_00.png", data / "val" / "brick" / "copy_of_brick_00.png")
    result = runner.invoke(app, ["train", str(data), "--out", str(tmp_path / "m"), "--cache-dir", str(cache_dir),
                                 "-q"])
    assert result.exit_code == 0, result.output
    assert "near-duplicate image pair(s) sit in different splits" in result.output
    assert "copy_of_brick_00.png" in result.output
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["leaks"]["count"] >= 1


FIGURE_FILES = ("confusion_counts.png", "confusion_normalised.png", "per_class.png", "reliability.png",
                "coverage.png")


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_a_painter_process_draws_the_same_figures(demo_model, tmp_path):
    """`tlearn train` has a second process draw the figures (painter.start): the same PNGs, pixel for pixel, as
    drawn here; and the child is gone once the report is written."""
    from tlearn.evaluate import painter

    here = demo_model.report(tmp_path / "here")
    painter.start()
    child = painter._started._child
    there = demo_model.report(tmp_path / "there")
    assert painter._started is None  # handed to that report, once
    for name in FIGURE_FILES:
        assert np.array_equal(_pixels(here.parent / name), _pixels(there.parent / name)), name
    assert here.read_text().split("written")[0] == there.read_text().split("written")[0]
    assert child.wait(timeout=30) == 0


def _coverage_rows(demo_model) -> list[dict]:
    from tlearn.evaluate.calibration import accuracy_coverage

    val = demo_model.scored_splits()["val"]
    return accuracy_coverage(val.proba(), val.labels)


def test_a_painter_that_died_or_failed(demo_model, tmp_path):
    """A painter process killed before the report, or one whose output is not its answers: the figures are drawn
    here. A figure that fails in the painter raises its traceback here, and no report is left looking complete."""
    from tlearn.evaluate import painter

    painter.start()
    painter._started._child.kill()
    painter._started._child.wait()
    html = demo_model.report(tmp_path / "killed")
    assert all(_pixels(html.parent / name).std() > 10 for name in FIGURE_FILES)

    painter.start()  # a child that answers with something that is not an answer: drawn here too
    talking = painter.take()
    talking._child.kill()
    talking._child.wait()
    talking._child.stdout = io.StringIO("Matplotlib is building the font cache\n")
    talking._child.stdin = io.StringIO()
    talking.draw("coverage", _coverage_rows(demo_model), tmp_path / "talking.png", "val")
    talking.finish()
    assert _pixels(tmp_path / "talking.png").std() > 10

    painter.start()
    failing = painter.take()
    failing.draw("coverage", [{"nonsense": 1}], tmp_path / "c.png", "val")
    with pytest.raises(painter.FigureError, match="coverage"):
        failing.finish()
    failing.close()
    assert not (tmp_path / "c.png").exists()


def test_the_painter_computes_the_same_folds_and_a_dead_one_leaves_them_to_this_process(tmp_path):
    """`tlearn train` asks the painter process (where scikit-learn is imported on a core of its own) for the
    cross-validation folds: the same folds as computed here, with near-duplicate groups kept together; a dead
    painter gives None, and make_folds computes them itself."""
    from tlearn.evaluate import painter
    from tlearn.train.choices import make_folds, stratified_group_folds

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 90)
    groups = np.arange(90)
    groups[10:14] = 10  # a near-duplicate group of four
    local = stratified_group_folds(labels, groups, 5, 7)
    painter.start()
    try:
        assert painter.prepare_folds()
        there = painter.folds(labels.tolist(), groups.tolist(), 5, 7)
        assert there == local.tolist()
        assert len(set(np.asarray(there)[10:14])) == 1
        asked = []
        folds = make_folds(labels, groups, ["a", "b", "c"], 7, store=tmp_path,
                           split=lambda *args: asked.append(args) or painter.folds(*args))
        assert asked and np.array_equal(folds.fold, local)
        painter._started._child.kill()
        painter._started._child.wait()
        assert painter.folds(labels.tolist(), groups.tolist(), 5, 7) is None
        again = make_folds(labels, groups, ["a", "b", "c"], 8, split=painter.folds)  # computed here instead
        assert np.array_equal(again.fold, stratified_group_folds(labels, groups, 5, 8))
    finally:
        painter.take().close()
