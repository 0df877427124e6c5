import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification

from tlearn.train import fit_head


@pytest.mark.parametrize("n_classes", [2, 4])
def test_folded_head_reproduces_the_chosen_model(n_classes):
    x, y = make_classification(400, 30, n_informative=10, n_classes=n_classes, class_sep=2.0, random_state=0)
    x = (x * 7 + 3).astype(np.float32)  # unstandardised, like raw backbone features
    fit = fit_head(x[:300], y[:300], x[300:], y[300:], n_classes)
    assert {row["C"] for row in fit.search} == {0.003, 0.01, 0.03, 0.1, 0.3, 1.0}
    best = max(fit.search, key=lambda r: (r["val_accuracy"], -r["val_log_loss"]))
    assert fit.C == best["C"]
    with torch.no_grad():
        pred = fit.head(torch.from_numpy(x[300:])).argmax(1).numpy()
    assert (pred == y[300:]).mean() == pytest.approx(best["val_accuracy"])
    assert best["val_accuracy"] > 0.7


def test_head_is_repeatable():
    x, y = make_classification(200, 20, n_classes=3, n_informative=6, random_state=1)
    a = fit_head(x[:150], y[:150], x[150:], y[150:], 3)
    b = fit_head(x[:150], y[:150], x[150:], y[150:], 3)
    assert torch.equal(a.head.weight, b.head.weight)
