"""Metrics that hold on small data: bootstrap intervals, temperature scaling, ECE, accuracy vs coverage."""
from __future__ import annotations

import numpy as np
import pytest

from tlearn.evaluate import classification_metrics
from tlearn.evaluate.calibration import (
    accuracy_coverage,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)
from tlearn.evaluate.metrics import ScoredSplit, bootstrap_intervals


def noisy_predictions(n: int, accuracy: float, classes: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    wrong = rng.random(n) > accuracy
    return y, np.where(wrong, (y + rng.integers(1, classes, n)) % classes, y)


@pytest.mark.parametrize("n,accuracy,classes,seed", [(60, 0.7, 4, 0), (300, 0.9, 7, 1), (25, 0.5, 6, 2)])
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_metrics_are_scikit_learns(n, accuracy, classes, seed):
    """Computed in numpy from the confusion matrix (importing scikit-learn costs a re-train ~0.5 s): the same
    numbers as scikit-learn's, including classes that never occur or are never predicted."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    y, p = noisy_predictions(n, accuracy, classes, seed)
    y[y == classes - 1] = 0  # the last class never occurs in y_true ...
    p[p == 1] = 2  # ... and class 1 is never predicted
    names = [f"c{i}" for i in range(classes)]
    m, labels = classification_metrics(y, p, names), list(range(classes))
    precision, recall, f1, support = precision_recall_fscore_support(y, p, labels=labels, zero_division=0)
    np.testing.assert_allclose([m["per_class"][c]["precision"] for c in names], precision)
    np.testing.assert_allclose([m["per_class"][c]["recall"] for c in names], recall)
    np.testing.assert_allclose([m["per_class"][c]["f1"] for c in names], f1)
    assert [m["per_class"][c]["support"] for c in names] == support.tolist()
    assert m["confusion_matrix"] == confusion_matrix(y, p, labels=labels).tolist()
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))
    present = [i for i in labels if i in set(y.tolist())]
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, labels=present, average="macro", zero_division=0))
    assert m["accuracy"] == pytest.approx((y == p).mean())


def test_bootstrap_intervals_agree_with_scipys():
    """The numpy bootstrap against scipy.stats.bootstrap (percentile method), on the same data; they draw
    different resamples, so they agree to a fraction of the interval's width."""
    from scipy.stats import bootstrap

    y, p = noisy_predictions(300, 0.8, seed=4)
    ours = bootstrap_intervals(y, p, 5)["accuracy"]
    theirs = bootstrap(((y == p).astype(float),), np.mean, n_resamples=4000, method="percentile",
                       rng=np.random.default_rng(7)).confidence_interval
    width = theirs.high - theirs.low
    assert ours[0] == pytest.approx(theirs.low, abs=0.1 * width)
    assert ours[1] == pytest.approx(theirs.high, abs=0.1 * width)


def test_intervals_contain_the_estimate_are_seeded_and_shrink_with_more_images():
    y, p = noisy_predictions(100, 0.8)
    m = classification_metrics(y, p, list("abcde"))
    for key in ("accuracy", "mean_class_accuracy"):
        low, high = m["ci95"][key]
        assert low < m[key] < high
    assert classification_metrics(y, p, list("abcde"))["ci95"] == m["ci95"]
    assert classification_metrics(y, p, list("abcde"), seed=1)["ci95"] != m["ci95"]
    y_big, p_big = noisy_predictions(2000, 0.8)
    wide, narrow = m["ci95"]["accuracy"], bootstrap_intervals(y_big, p_big, 5)["accuracy"]
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 2


def test_interval_width_matches_the_binomial_standard_error():
    y, p = noisy_predictions(400, 0.75, seed=3)
    acc = float((y == p).mean())
    low, high = bootstrap_intervals(y, p, 5)["accuracy"]
    half_width = 1.96 * np.sqrt(acc * (1 - acc) / len(y))
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.15)


def test_mean_class_accuracy_interval_weighs_a_rare_class_fully():
    # 95 images of class 0 all right, 5 of class 1 all wrong: accuracy 0.95, mean class accuracy 0.5
    y = np.array([0] * 95 + [1] * 5)
    p = np.zeros(100, dtype=int)
    m = classification_metrics(y, p, ["common", "rare"])
    assert m["mean_class_accuracy"] == 0.5
    low, high = m["ci95"]["mean_class_accuracy"]
    assert low <= 0.5 <= high and high < 0.95


def sampled_split(n: int, true_temperature: float, seed: int, name: str = "val") -> ScoredSplit:
    """Logits whose labels are drawn from softmax(logits / true_temperature): that T is the right one."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, 6))
    scaled = np.exp(logits / true_temperature)
    proba = scaled / scaled.sum(1, keepdims=True)
    labels = np.array([rng.choice(6, p=row) for row in proba])
    return ScoredSplit(name, [], labels, logits)


def test_fitted_temperature_recovers_the_true_one_and_lowers_held_out_ece():
    val, test = sampled_split(3000, 2.0, seed=0), sampled_split(3000, 2.0, seed=1, name="test")
    assert fit_temperature(val.logits, val.labels) == pytest.approx(2.0, rel=0.1)
    section = calibrate({"test": test}, val)
    assert section["fitted_on"] == "val" and set(section["ece_after"]) == {"val", "test"}
    assert section["ece_after"]["test"] < section["ece_before"]["test"] / 2


def test_calibrate_does_not_look_at_test():
    val, test = sampled_split(500, 1.5, seed=2), sampled_split(500, 1.5, seed=3, name="test")
    shuffled = ScoredSplit("test", [], np.roll(test.labels, 1), test.logits)
    assert calibrate({"test": test}, val)["temperature"] == calibrate({"test": shuffled}, val)["temperature"]


def test_ece_is_zero_when_confidence_equals_accuracy_and_bins_add_up():
    proba = np.array([[0.75, 0.25]] * 4)
    labels = np.array([0, 0, 0, 1])  # 75% confident, 75% right
    assert expected_calibration_error(proba, labels) == pytest.approx(0.0)
    overconfident = np.array([[0.99, 0.01]] * 4)
    assert expected_calibration_error(overconfident, labels) == pytest.approx(0.24)
    assert sum(b["n"] for b in reliability_bins(overconfident, labels)) == 4


def test_accuracy_coverage_trades_answers_for_accuracy():
    split = sampled_split(1000, 1.0, seed=4)
    rows = accuracy_coverage(split.proba(), split.labels)
    assert rows[0]["threshold"] == 0.0 and rows[0]["coverage"] == 1.0
    coverages = [r["coverage"] for r in rows]
    assert coverages == sorted(coverages, reverse=True)
    answered = [r for r in rows if r["accuracy"] is not None]
    assert answered[-1]["accuracy"] > rows[0]["accuracy"] + 0.1


def test_no_sharpening_when_val_has_no_mistakes():
    split = sampled_split(200, 1.0, seed=5)
    perfect = ScoredSplit("val", [], split.logits.argmax(1), split.logits)
    section = calibrate({}, perfect)
    assert section["temperature"] == 1.0 and section["ece_after"] == section["ece_before"]


def test_report_figures_stay_small_with_a_thousand_classes(tmp_path):
    """Past 50 classes the figures show the classes that matter most: 1,000 classes once took gigabytes."""
    from PIL import Image

    from tlearn.evaluate.metrics import ScoredSplit
    from tlearn.evaluate.report import ReportInputs, write_report

    rng = np.random.default_rng(0)
    classes = [f"class {i}" for i in range(1000)]
    labels = np.repeat(np.arange(1000), 2)
    logits = rng.normal(size=(2000, 1000))
    logits[np.arange(2000), labels] += 3.0  # mostly right, some confusions
    scored = {"test": ScoredSplit("test", [tmp_path / f"{i}.png" for i in range(2000)], labels, logits)}
    write_report(tmp_path / "report", ReportInputs(classes=classes, scored=scored))
    for name in ("confusion_counts.png", "per_class.png"):
        width, height = Image.open(tmp_path / "report" / name).size
        assert width < 3000 and height < 3000, (name, width, height)
