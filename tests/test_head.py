import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

from tlearn.train import balanced_class_weight, fit_head, normalise_features


def _data(n_classes, seed=0):
    x, y = make_classification(400, 30, n_informative=10, n_classes=n_classes, class_sep=2.0, random_state=seed)
    return (x * 7 + 3).astype(np.float32), y  # unnormalised, like raw backbone features


@pytest.mark.parametrize("n_classes", [2, 4])
def test_head_is_chosen_on_val(n_classes):
    x, y = _data(n_classes)
    fit = fit_head(x[:300], y[:300], x[300:], y[300:], n_classes)
    assert [row["C"] for row in fit.search] == [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0]
    best = max(fit.search, key=lambda r: (r["val_accuracy"], -r["val_log_loss"]))
    assert fit.C == best["C"]
    pred = fit.head.logits(x[300:]).argmax(1)
    assert (pred == y[300:]).mean() == pytest.approx(best["val_accuracy"])
    assert best["val_accuracy"] > 0.8


def test_head_solves_the_same_problem_as_scikit_learn():
    x, y = _data(3, seed=2)
    fit = fit_head(x[:300], y[:300], x[300:], y[300:], 3, c_grid=(3.0,))
    xn = normalise_features(x)
    reference = LogisticRegression(C=3.0, max_iter=5000, tol=1e-8).fit(xn[:300], y[:300])
    ours = softmax(fit.head.logits(x[300:]), axis=1)
    np.testing.assert_allclose(ours, reference.predict_proba(xn[300:]), atol=2e-3)


def test_balanced_weights_only_differ_from_one_when_imbalanced():
    assert balanced_class_weight(np.array([0, 0, 1, 1]), 2).tolist() == [1.0, 1.0]
    assert balanced_class_weight(np.array([0, 0, 0, 1]), 2).tolist() == pytest.approx([2 / 3, 2.0])


def test_head_is_repeatable():
    x, y = _data(3, seed=1)
    a = fit_head(x[:150], y[:150], x[150:], y[150:], 3)
    b = fit_head(x[:150], y[:150], x[150:], y[150:], 3)
    assert np.array_equal(a.head.weight, b.head.weight) and np.array_equal(a.head.bias, b.head.bias)


def test_normalisation_matches_the_torch_classifier():
    """The head is fitted in numpy and runs in torch inside the classifier: both must normalise alike."""
    from torch import nn

    from tlearn.classifier import Classifier

    x, y = _data(3, seed=3)
    fit = fit_head(x[:300], y[:300], x[300:], y[300:], 3, c_grid=(1.0,))
    x[0] = 0  # a zero feature vector must not become NaN on either side
    with torch.no_grad():
        torch_logits = Classifier.from_head(nn.Identity(), fit.head)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(fit.head.logits(x), torch_logits, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(normalise_features(x[1:]), axis=1), 1, atol=1e-6)
