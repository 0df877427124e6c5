import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import tlearn
from conftest import link_subset
from tlearn.cli import app
from tlearn.predict import Prediction, Predictor, Unreadable

runner = CliRunner()


def test_demo_model_learns_the_textures(demo_model):
    assert demo_model.metrics_["test"]["accuracy"] >= 0.9
    assert demo_model.metrics_["val"]["n"] == 18
    assert demo_model.summary_.extracted + demo_model.summary_.from_cache == 84


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
    assert sorted(Path(r.source).name for r in rows if isinstance(r, Unreadable)) == ["bad.jpg", "missing.png"]


def test_second_fit_uses_the_cache_and_gives_the_same_model(demo_model, demo_data, cache_dir):
    again = tlearn.ImageClassifier(cache_dir=cache_dir, progress=False).fit(demo_data)
    assert again.summary_.extracted == 0
    assert again.metrics_ == demo_model.metrics_


def test_a_model_of_all_the_data_is_written_whole_and_says_nothing_was_held_out(demo_data, cache_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_data / "train", data / "train")  # a train/ folder alone, nothing asked to be carved
    clf = tlearn.ImageClassifier(cache_dir=cache_dir, progress=False, test_fraction=0).fit(data)
    assert clf.bundle_.split_files("train") and not clf.bundle_.split_files("test")
    model = clf.save(tmp_path / "model")
    page = (Path(model) / "report" / "report.html").read_text()
    assert "no held-out split" in page and "Confusion matrix" not in page
    top = Predictor.load(model).predict([next((demo_data / "test").rglob("*.png"))])[0]
    assert top.label in clf.classes_


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


def test_a_fresh_model_predicts_and_explains_on_its_trains_engines_as_its_folder_does(demo_data, tmp_path):
    """A fit that extracted hands its opened engine and feature-map engine to the classifier's predictor (the report
    compiles nothing again): what it predicts and explains is what the saved folder's predictor gives."""
    clf = tlearn.ImageClassifier(cache_dir=tmp_path / "cache", progress=False).fit(demo_data)
    fresh = clf.predictor()
    assert fresh._feature_map is not None  # ready before the report asks for a heat map
    loaded = Predictor.load(clf.save(tmp_path / "model"))
    assert clf.predictor() is fresh and fresh.card.engine == loaded.card.engine
    files = sorted((demo_data / "test").rglob("*.png"))[:4]
    assert np.abs(fresh.probabilities(np.stack([fresh.to_pixels(f) for f in files]))
                  - loaded.probabilities(np.stack([loaded.to_pixels(f) for f in files]))).max() < 1e-6
    for file in files[:2]:
        mine, theirs = fresh.explain(file), loaded.explain(file)
        assert mine.label == theirs.label and np.abs(mine.grid - theirs.grid).max() < 1e-5


def test_prediction_imports_no_torch(demo_model, demo_data, tmp_path):
    """A model folder carries its verified engine: loading and predicting build no network and import no torch,
    timm or Lightning, whatever the feature cache holds, and give the same probabilities."""
    folder = demo_model.save(tmp_path / "model")
    files = sorted((demo_data / "test").rglob("*.png"))[:4]
    script = (f"import sys, json, tlearn\n"
              f"p = tlearn.Predictor.load({str(folder)!r})\n"
              f"rows = p.predict({[str(f) for f in files]!r})\n"
              "heavy = [m for m in ('torch', 'timm', 'lightning', 'torchvision', 'sklearn') if m in sys.modules]\n"
              "print(json.dumps([[r.probabilities for r in rows], heavy]))\n")
    env = {**os.environ, "TLEARN_CACHE": str(tmp_path / "empty-cache")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    proba, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert heavy == []
    assert abs(np.array(proba) - demo_model.predict_proba(files)).max() < 1e-5


def test_predictor_takes_paths_bytes_pil_images_and_arrays_alike(demo_model, demo_data, tmp_path):
    from PIL import Image

    predictor = tlearn.Predictor.load(demo_model.save(tmp_path / "m"))
    path = sorted((demo_data / "test" / "gravel").iterdir())[0]
    image = Image.open(path).convert("RGB")
    rows = predictor.predict([path, path.read_bytes(), image, np.asarray(image), b"not an image"], top_k=3)
    assert [r.source for r in rows[1:]] == ["<image 1>", "<image 2>", "<image 3>", "<image 4>"]
    assert isinstance(rows[4], Unreadable) and "not an image" in rows[4].reason
    first = np.array(rows[0].probabilities)
    for row in rows[1:4]:
        assert row.label == "gravel" and np.abs(np.array(row.probabilities) - first).max() < 1e-6
    assert predictor.card.name == "m" and predictor.card.classes == ["brick", "grass", "gravel"]
    assert len(predictor.card.model_sha256) == 64 and predictor.card.engine in ("openvino", "onnx")


def test_predictor_is_thread_safe(demo_model, demo_data, tmp_path):
    """Many threads share one Predictor (one engine session): every answer equals the single-threaded one."""
    from concurrent.futures import ThreadPoolExecutor

    predictor = tlearn.Predictor.load(demo_model.save(tmp_path / "m"))
    files = sorted((demo_data / "test").rglob("*.png"))
    expected = {str(f): predictor.predict([f])[0].probabilities for f in files}
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda f: predictor.predict([f])[0], files * 4))
    assert all(np.allclose(r.probabilities, expected[r.source], atol=1e-6) for r in got)


def test_retrain_with_a_corrupt_file_imports_no_torch_the_second_time(hymenoptera_small, tmp_path):
    """Decode failures are cached by content like features: a dataset with a bad file still re-trains from the
    cache alone."""
    data = link_subset(hymenoptera_small, tmp_path / "data", {"train": 4, "val": 3})
    good = next((hymenoptera_small / "train" / "ants").iterdir()).read_bytes()
    (data / "train" / "ants" / "corrupt.jpg").write_bytes(good[:400])
    script = (f"import sys, tlearn\n"
              f"clf = tlearn.ImageClassifier(cache_dir={str(tmp_path / 'cache')!r}, progress=False)"
              f".fit({str(data)!r})\n"
              "print(clf.summary_.extracted, len(clf.summary_.skipped_files), 'torch' in sys.modules)\n")
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert first.stdout.split()[:2] == ["14", "1"]
    assert second.stdout.split() == ["0", "1", "False"]


@pytest.mark.parametrize("settings,message", [
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"batch_size": -1}, "batch_size must be >= 1"),
    ({"test_fraction": 1.0}, "test_fraction must be"),
    ({"val_fraction": -0.1}, "val_fraction must be"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction \\+ test_fraction"),
    ({"engine": "tensorrt"}, "unknown engine"),
    ({"precision": "fp8"}, "unknown precision"),
    ({"recipe": "magic"}, "unknown recipe"),
    ({"backbone": "alexnet"}, "unknown backbone"),
])
def test_settings_are_checked_before_any_work(demo_data, settings, message):
    with pytest.raises(tlearn.TlearnError, match=message):
        tlearn.ImageClassifier(progress=False, **settings).fit(demo_data)


def test_importing_tlearn_changes_nothing_process_wide():
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    script = "import os, tlearn, tlearn.cli; print(os.environ.get('HF_HUB_OFFLINE'))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip() == "None"


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
    assert sorted(Path(s["path"]).name for s in config["extra"]["skipped_files"]) == ["README.jpg", "truncated.jpg"]
    assert (data / "train/ants/truncated.jpg").exists()

    result = runner.invoke(app, ["evaluate", str(model), str(data), "--split", "val", "--json",
                                 "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    recorded = json.loads((model / "metrics.json").read_text())["val"]
    assert metrics["n"] == 8 and metrics["accuracy"] == recorded["accuracy"]

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
    result = runner.invoke(app, ["train", str(tmp_path), "--batch-size", "0", "-q"])
    assert result.exit_code == 2 and "batch_size must be >= 1" in result.output


def test_backbones_command_lists_offline_weights():
    result = runner.invoke(app, ["backbones"])
    assert result.exit_code == 0
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        assert name in result.output
    assert "yes" in result.output
    assert "inception_resnet_v2.tf_in1k" in result.output  # nothing cut at 80 columns
    assert max(len(line) for line in result.output.splitlines()) <= 80


def test_help_texts_show_their_defaults_whole():
    for command in ("train", "predict", "export", "report"):
        result = runner.invoke(app, [command, "--help"], terminal_width=100)
        assert result.exit_code == 0 and not re.search(r"\w \.", result.output), result.output


def test_console_script_runs_the_demo(tmp_path):
    """The installed `tlearn` entry point, in a real process, end to end on the built-in demo."""
    exe = Path(sys.executable).with_name("tlearn")
    env = {**os.environ, "TLEARN_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([str(exe), "demo", "--out", str(tmp_path / "demo")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout and "brick_00.png" in done.stdout
    assert (tmp_path / "demo" / "model" / "model.safetensors").is_file()


def test_train_on_new_images_imports_no_torch_once_the_engine_is_exported(demo_data, hymenoptera_small, tmp_path):
    """A first train exports and verifies the backbone's engine into the cache: a train on images never seen
    runs them through that engine (and takes the backbone's tensors from the cache) without torch or timm."""
    cache = tmp_path / "cache"
    tlearn.ImageClassifier(cache_dir=cache, progress=False).fit(demo_data)
    data = link_subset(hymenoptera_small, tmp_path / "data", {"train": 3, "val": 2})
    script = (f"import sys, tlearn\n"
              f"clf = tlearn.ImageClassifier(cache_dir={str(cache)!r}, progress=False).fit({str(data)!r})\n"
              "print(clf.summary_.extracted, [m for m in ('torch', 'timm') if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "10 []"


def test_ctrl_c_says_what_was_kept_and_exits_130(demo_data, tmp_path):
    import signal
    import time

    exe = Path(sys.executable).with_name("tlearn")
    env = {**os.environ, "TLEARN_CACHE": str(tmp_path / "cache")}
    run = subprocess.Popen([str(exe), "train", str(demo_data), "--out", str(tmp_path / "model")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # inside the work: imports, discovery or the engine build
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr and "--resume" in stderr
    assert not (tmp_path / "model").exists()


def test_the_quick_exit_loses_no_output(demo_model_dir, demo_data, tmp_path):
    """`tlearn` leaves without the interpreter's teardown once a command is done: what it printed to a pipe (one
    CSV row per image) and wrote to files arrives whole, with the command's own exit code."""
    images = sorted(p for p in demo_data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    run = subprocess.run([sys.executable, "-m", "tlearn.cli", "predict", str(demo_model_dir), str(demo_data),
                          "--output", str(tmp_path / "rows.json")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert len(json.loads((tmp_path / "rows.json").read_text())["predictions"]) == len(images)  # JSON by suffix
    piped = subprocess.run([sys.executable, "-m", "tlearn.cli", "predict", str(demo_model_dir), str(demo_data)],
                           capture_output=True, text=True)
    assert piped.returncode == 0 and len(piped.stdout.strip().splitlines()) == len(images) + 1  # and the header
    missing = subprocess.run([sys.executable, "-m", "tlearn.cli", "predict", str(demo_model_dir),
                              str(tmp_path / "absent")], capture_output=True, text=True)
    assert missing.returncode == 2 and "absent" in missing.stderr


def _copy_images(files, folder: Path, prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n, f in enumerate(files):
        (folder / f"{prefix}{n}.jpg").write_bytes(Path(f).read_bytes())  # a new name: known again by content alone


def test_evaluate_scores_a_new_folder_whole_and_never_an_image_that_trained_the_model(hymenoptera_small,
                                                                                      hymenoptera_model, tmp_path,
                                                                                      cache_dir):
    """`evaluate` on the training folder scores its val split (as metrics.json); on a new unsplit folder it scores
    every image, but leaves out those whose bytes trained the model, under whatever name; a folder made only of
    training images is one clear line, exit 2."""
    from tlearn.scoring import evaluate_dataset

    new = tmp_path / "new"
    for name in ("ants", "bees"):
        _copy_images(sorted((hymenoptera_small / "val" / name).iterdir()), new / name, "val-")
    _copy_images(sorted((hymenoptera_small / "train" / "ants").iterdir())[:2], new / "ants", "seen-")

    result = runner.invoke(app, ["evaluate", str(hymenoptera_model), str(new), "--json", "--cache-dir",
                                 str(cache_dir)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["evaluated"] == {"split": "all", "how": "every image of a folder other than the one it was "
                                    "trained on", "left_out_trained": 2, "training_images_known": True,
                                    "training_folder": False}
    recorded = json.loads((hymenoptera_model / "metrics.json").read_text())["val"]
    assert metrics["n"] == 8 and metrics["accuracy"] == recorded["accuracy"]  # the same 8 val photos, renamed

    result = runner.invoke(app, ["evaluate", str(hymenoptera_model), str(hymenoptera_small), "--cache-dir",
                                 str(cache_dir)])
    assert result.exit_code == 0, result.output
    assert "scored: the val split of the folder the model was trained on" in result.output
    assert "left out" not in result.output and "n=8" in result.output

    later = tmp_path / "later" / "test"  # new photos kept in a test/ folder: no train/ is needed to score them
    for name in ("ants", "bees"):
        _copy_images(sorted((hymenoptera_small / "val" / name).iterdir()), later / name, "")
    result = runner.invoke(app, ["evaluate", str(hymenoptera_model), str(later.parent), "--json", "--cache-dir",
                                 str(cache_dir)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 8 and json.loads(result.stdout)["evaluated"]["split"] == "all"
    result = runner.invoke(app, ["train", str(later.parent), "--cache-dir", str(cache_dir), "-q"])
    assert result.exit_code == 2 and "has test/ but no train/ folder" in result.output  # training still needs one

    only_seen = tmp_path / "seen"
    for name in ("ants", "bees"):
        _copy_images(sorted((hymenoptera_small / "train" / name).iterdir()), only_seen / name, "x-")
    result = runner.invoke(app, ["evaluate", str(hymenoptera_model), str(only_seen), "--cache-dir", str(cache_dir)])
    assert result.exit_code == 2 and "nothing to evaluate" in result.output and "trained this model" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["evaluate", str(hymenoptera_model), str(only_seen), "--split", "everything"])
    assert result.exit_code == 2 and "everything" in result.output and "Traceback" not in result.output

    moved = tmp_path / "moved"  # the training folder copied elsewhere: known by its content, its val scored
    for split, name in ((s, n) for s in ("train", "val") for n in ("ants", "bees")):
        _copy_images(sorted((hymenoptera_small / split / name).iterdir()), moved / split / name, "")
    result = runner.invoke(app, ["evaluate", str(hymenoptera_model), str(moved), "--json", "--cache-dir",
                                 str(cache_dir)])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.stdout)["evaluated"]
    assert (evaluated["split"], evaluated["training_folder"], evaluated["left_out_trained"]) == ("val", True, 0)
    result = runner.invoke(app, ["evaluate", str(hymenoptera_model), str(moved), "--split", "train", "--json",
                                 "--cache-dir", str(cache_dir)])
    assert json.loads(result.stdout)["n"] == 12  # the training images themselves, as asked (with a note)

    # a model folder from before the training content was recorded: its training files, still there, are read
    predictor = Predictor.load(hymenoptera_model)
    predictor.bundle.split.pop("train_content")
    older = evaluate_dataset(predictor, new, cache_dir=cache_dir, progress=False)
    assert (older.split, older.left_out, older.checked, len(older.scored.labels)) == ("all", 2, True, 8)


def test_evaluate_defaults_to_the_carved_test_split_of_the_training_folder(demo_model, demo_data, tmp_path):
    """One folder per class: `auto` scores the test split training carved, as metrics.json; the command line's
    choices are the API's; a model folder whose recorded training content is not hex is refused on load."""
    from tlearn.cli.model import SplitName
    from tlearn.errors import BundleError
    from tlearn.scoring import EVALUATION_SPLITS

    metrics = demo_model.evaluate(demo_data)
    assert metrics["evaluated"]["split"] == "test" and metrics["evaluated"]["training_folder"]
    assert metrics["accuracy"] == demo_model.metrics_["test"]["accuracy"] and metrics["n"] == demo_model.metrics_[
        "test"]["n"]
    assert tuple(s.value for s in SplitName) == EVALUATION_SPLITS
    with pytest.raises(tlearn.errors.DatasetError, match="unknown split 'everything'"):
        demo_model.evaluate(demo_data, "everything")

    folder = demo_model.save(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config["split"]["train_content"][0] = "not hex at all!!"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="train_content"):
        Predictor.load(folder)


def test_evaluate_keeps_the_relabel_file_training_honoured(hymenoptera_small, tmp_path, cache_dir):
    """A model trained with --relabel is measured on its training folder with those labels, as metrics.json."""
    moved = sorted((hymenoptera_small / "val" / "ants").iterdir())[0]
    relabel = tmp_path / "fix.csv"
    relabel.write_text(f"path,label\n{moved.relative_to(hymenoptera_small)},bees\n")
    model = tmp_path / "model"
    result = runner.invoke(app, ["train", str(hymenoptera_small), "--out", str(model), "--relabel", str(relabel),
                                 "--cache-dir", str(cache_dir), "-q"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(model), str(hymenoptera_small), "--json", "--cache-dir",
                                 str(cache_dir)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    recorded = json.loads((model / "metrics.json").read_text())["val"]
    assert metrics["per_class"]["bees"]["support"] == 5 and metrics["per_class"]["ants"]["support"] == 3
    assert metrics["accuracy"] == recorded["accuracy"] and metrics["evaluated"]["split"] == "val"
