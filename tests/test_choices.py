"""Choices by cross-validation on train (tlearn.train.choices), the head refit on all of train, and the out-of-fold
probabilities kept in the model folder: on real photos and real weights (blood-cell microscopy, ants and bees)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tlearn.cli import app
from tlearn.errors import DatasetError
from tlearn.train.choices import C_GRID, Candidate, choose_head, make_folds, refit

PBC8 = Path(__file__).parent / "data" / "pbc8-mini"  # 8 blood-cell classes x 6 microscope photos (CC BY 4.0)
runner = CliRunner()


@pytest.fixture(scope="module")
def pbc_root(tmp_path_factory):
    """pbc8-mini as train/ (5 per class) and test/ (1 per class): a carved test of 15% of 6 images per class would
    leave some classes 2 training images, too few for 5 folds."""
    root = tmp_path_factory.mktemp("pbc8")
    for cls in sorted(p.name for p in PBC8.iterdir() if p.is_dir()):
        files = sorted((PBC8 / cls).iterdir())
        for split, chosen in (("train", files[:5]), ("test", files[5:])):
            (root / split / cls).mkdir(parents=True)
            for f in chosen:
                os.symlink(f, root / split / cls / f.name)
    return root


@pytest.fixture(scope="module")
def pbc_cache(tmp_path_factory):
    """A cache of this module's own: the damage test breaks every choice record in it."""
    return tmp_path_factory.mktemp("pbc-cache")


@pytest.fixture(scope="module")
def pbc_model(pbc_root, pbc_cache, tmp_path_factory):
    import tlearn

    clf = tlearn.ImageClassifier(cache_dir=pbc_cache, progress=False).fit(pbc_root)
    return clf, clf.save(tmp_path_factory.mktemp("pbc") / "model", report=False)


def test_the_head_is_chosen_by_folds_of_train_and_refit_on_all_of_it(pbc_model):
    clf, folder = pbc_model
    bundle, train = clf.bundle_, clf.bundle_.split["files"]["train"]
    assert set(clf.bundle_.split["files"]) == {"train", "test"}  # no val carved: nothing is left out to choose
    head, cv = bundle.training["head"], bundle.metrics["cv"]
    assert head["C"] in C_GRID and head["refit"] == f"all {len(train)} training images"
    assert cv["folds"]["k"] == 5 and cv["n"] == len(train) and "log loss" in cv["chosen_by"]
    assert set(cv["per_class"]) == set(bundle.classes)
    tried = [s["C"] for s in head["search"]]
    assert tried == sorted(tried) and head["C"] in tried  # one warm-started path up the grid
    best = min(s["log_loss"] for s in head["search"])
    assert cv["log_loss"] == pytest.approx(best)
    assert bundle.extra["calibration"]["fitted_on"] == "out-of-fold train"
    on_disk = json.loads((folder / "metrics.json").read_text())["cv"]
    assert on_disk["accuracy"] == pytest.approx(cv["accuracy"])


def test_out_of_fold_probabilities_come_from_heads_that_never_saw_the_image(pbc_model):
    import pandas as pd

    from tlearn.bundle import Bundle
    from tlearn.train.head import fit_path

    clf, folder = pbc_model
    table = pd.read_csv(folder / "out_of_fold.csv")  # documented format, readable with pandas
    bundle = Bundle.load(folder)
    train = [p for p, _ in bundle.split["files"]["train"]]
    assert table["path"].tolist() == train and len(table) == len(train)
    probs = table[[f"prob:{c}" for c in bundle.classes]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert (table["predicted"] == np.array(bundle.classes)[probs.argmax(1)]).all()
    assert set(table["fold"]) == set(range(5))
    # refit fold 0's head by hand from the cached features: it gives that fold's rows their recorded probabilities
    features, labels = _train_features(clf)
    assert [bundle.classes[i] for i in labels] == table["label"].tolist()
    held = table["fold"].to_numpy() == 0
    grid = [c for c in C_GRID if c <= bundle.training["head"]["C"]]
    *_, (_, head) = fit_path(features[~held], labels[~held], len(bundle.classes), grid)
    logits = head.logits(features[held]) / bundle.temperature
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs[held], expected / expected.sum(1, keepdims=True), atol=2e-3)
    # and the shipped head, which did see them, is surer of their given labels than the out-of-fold one
    shipped = bundle.head(calibrated=True).logits(features[held])
    shipped = np.exp(shipped - shipped.max(1, keepdims=True))
    shipped /= shipped.sum(1, keepdims=True)
    rows = np.arange(held.sum())
    assert shipped[rows, labels[held]].mean() > probs[held][rows, labels[held]].mean()


def test_imbalanced_classes_choose_a_weighting_on_a_balanced_score(pbc_model):
    clf, _ = pbc_model
    x, y = _train_features(clf)
    keep = np.concatenate([np.flatnonzero(y == 0), *(np.flatnonzero(y == c)[:2] for c in range(1, y.max() + 1))])
    keep = np.concatenate([keep, np.flatnonzero(y == 0)])  # class 0 twice: 10 rows against 2 of every other
    folds = make_folds(y[keep], None, clf.bundle_.classes, seed=0)
    assert folds.k == 2 and "'" in folds.note  # 2 images in the smallest classes: 2 folds, said by name
    choice = choose_head(Candidate("off", x[keep]), y[keep], folds, len(clf.bundle_.classes))
    assert choice.metric == "class-balanced log loss"
    assert {s["class_weight"] for s in choice.search} == {"none", "balanced"}
    assert choice.score == min(s["balanced_log_loss"] for s in choice.search
                               if s["class_weight"] == choice.class_weight)
    head = refit(Candidate("off", x[keep]), y[keep], choice, len(clf.bundle_.classes))
    assert head.weight.shape == (len(clf.bundle_.classes), x.shape[1])


def test_folds_keep_near_duplicate_groups_together_and_stay_stratified():
    labels = np.repeat(np.arange(3), 20)
    groups = np.arange(60) // 3  # groups of three images, each of one class
    folds = make_folds(labels, groups, ["a", "b", "c"], seed=1)
    assert folds.k == 5 and folds.grouped == 60
    for g in range(20):
        assert len(set(folds.fold[groups == g])) == 1
    for f in range(5):
        assert set(labels[folds.fold == f]) == {0, 1, 2}
    assert not np.array_equal(folds.fold, make_folds(labels, groups, ["a", "b", "c"], seed=2).fold)


def test_a_class_with_one_training_image_is_refused_by_name():
    with pytest.raises(DatasetError, match="class 'lonely' has a single training image"):
        make_folds(np.array([0, 0, 0, 1]), None, ["many", "lonely"], seed=0)
    with pytest.raises(DatasetError, match="one class only"):
        make_folds(np.zeros(5, int), None, ["a", "b"], seed=0)


def test_a_retrain_reads_the_choice_and_a_damaged_record_is_chosen_again(pbc_model, pbc_root, pbc_cache):
    import tlearn

    clf, _ = pbc_model
    records = sorted((Path(pbc_cache) / "choices").glob("*.json"))
    assert records
    again = tlearn.ImageClassifier(cache_dir=pbc_cache, progress=False).fit(pbc_root)
    np.testing.assert_array_equal(again.bundle_.state["head.weight"], clf.bundle_.state["head.weight"])
    for record in records:
        record.write_text("{not json")
    third = tlearn.ImageClassifier(cache_dir=pbc_cache, progress=False).fit(pbc_root)
    assert third.bundle_.training["head"]["C"] == clf.bundle_.training["head"]["C"]
    assert all(json.loads(r.read_text())["choice"]["C"] for r in records)  # written again, whole


def _small_classes(root: Path, counts: dict[str, int]) -> Path:
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for f in sorted((PBC8 / cls).iterdir())[:n]:
            os.symlink(f, root / cls / f.name)
    return root


def test_cli_says_in_one_line_when_folds_are_fewer_or_a_class_cannot_be_learned(tmp_path, cache_dir):
    few = _small_classes(tmp_path / "few" / "train", {"basophil": 6, "platelet": 3})
    _small_classes(tmp_path / "few" / "test", {"basophil": 1, "platelet": 1})
    done = runner.invoke(app, ["train", str(few.parent), "--out", str(tmp_path / "m1"), "--cache-dir",
                               str(cache_dir)])
    assert done.exit_code == 0, done.output
    assert "3-fold cross-validation instead of 5: class 'platelet' has 3 training images" in " ".join(
        done.output.split())
    one = _small_classes(tmp_path / "one" / "train", {"basophil": 6, "platelet": 1})
    _small_classes(tmp_path / "one" / "test", {"basophil": 1, "platelet": 1})
    done = runner.invoke(app, ["train", str(one.parent), "--out", str(tmp_path / "m2"), "--cache-dir",
                               str(cache_dir)])
    assert done.exit_code == 2 and "class 'platelet' has a single training image" in done.output
    assert "Traceback" not in done.output and not (tmp_path / "m2").exists()


def _train_features(clf):
    from tlearn.features import FeatureCache
    from tlearn.features.extract import extract_features

    bundle = clf.bundle_
    paths = [Path(clf.summary_.data) / p for p, _ in bundle.split["files"]["train"]]
    with FeatureCache(bundle.backbone.feature_key, clf.cache_dir) as cache:
        features = extract_features(paths, cache, None, bundle.preprocessing, progress=False)
    return features.vectors, np.array([label for _, label in bundle.split["files"]["train"]])
