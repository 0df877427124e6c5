"""Stage 1 of every recipe: a softmax-regression head on frozen, cached features.

Features are L2-normalised (the classifier does the same in front of its head), then an L2-regularised
multinomial logistic regression is fitted for each strength on a path from strong to weak regularisation, each
fit warm-started from the previous one; the strength is chosen on the validation split.

numpy and scipy only: a re-train on cached features then never imports torch (seconds on a 2-core machine).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

# Inverse regularisation strengths tried, strongest first (C as in scikit-learn: penalty ||W||^2 / (2 C n)).
DEFAULT_C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
# L-BFGS: 1e-5 on the gradient chose the same strengths with the same accuracies as 1e-6 on hymenoptera and
# oxford17flowers, 35% sooner.
MAX_ITERATIONS, HISTORY, GRADIENT_TOLERANCE = 300, 20, 1e-5


@dataclass(frozen=True)
class ImageNetPrior:
    """What the backbone's own ImageNet classifier says of an image, as extra inputs of the head: the square roots
    of its 1,000 class probabilities (a unit vector: the Hellinger embedding of the distribution, where Euclidean
    distances follow the distributions' own), weighted by `scale` against the L2-normalised features.

    The classifier is linear on the very pooled features tlearn caches, so the prior costs no forward pass: a
    (1000 x features) product in numpy. Cross-validation decides whether a head uses it (tlearn.train.choices):
    it helps where the classes are ImageNet-like (ants and bees) and is left out where they are not."""

    weight: np.ndarray  # (1000, features) float32: the ImageNet classifier
    bias: np.ndarray  # (1000,) float32
    scale: float

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """The ImageNet class probabilities (n, 1000) of pooled features (n, features), in the features' precision."""
        logits = features @ self.weight.T.astype(features.dtype, copy=False) + self.bias
        logits -= logits.max(-1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(-1, keepdims=True)

    def inputs(self, features: np.ndarray) -> np.ndarray:
        """[normalise(features), scale * sqrt(ImageNet probabilities)] of pooled features (n, features)."""
        features = np.asarray(features, np.float32)
        return np.concatenate([normalise_features(features), self.scale * np.sqrt(self.probabilities(features))], -1)

    def state(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the classifier's tensors and the scale (what keeps a choice made with this prior)."""
        import hashlib

        digest = hashlib.sha256(repr(self.scale).encode())
        digest.update(np.ascontiguousarray(self.weight, np.float32).tobytes())
        digest.update(np.ascontiguousarray(self.bias, np.float32).tobytes())
        return digest.hexdigest()


def head_inputs(features: np.ndarray, prior: ImageNetPrior | None) -> np.ndarray:
    """What a head's weights multiply (before the normalisation every head applies): the pooled features, or the
    features with the ImageNet prior beside them."""
    return features if prior is None else prior.inputs(features)


@dataclass
class LinearHead:
    """logits = normalise(inputs) @ weight.T + bias, where the inputs are the pooled features, or the normalised
    features with the ImageNet prior beside them (`prior`, when cross-validation chose it)."""

    weight: np.ndarray  # (classes, inputs) float32
    bias: np.ndarray  # (classes,) float32
    prior: ImageNetPrior | None = None

    def logits(self, features: np.ndarray) -> np.ndarray:
        return normalise_features(head_inputs(features, self.prior)) @ self.weight.T + self.bias

    def state(self) -> dict[str, np.ndarray]:
        """The head's tensors under the names torch's nn.Linear gives them."""
        return {"weight": self.weight, "bias": self.bias}


@dataclass
class HeadFit:
    head: LinearHead  # acts on L2-normalised features
    C: float  # chosen inverse regularisation strength
    search: list[dict]  # val accuracy and log-loss of each C tried


def normalise_features(features: np.ndarray) -> np.ndarray:
    """The feature normalisation every head sees, in training and in prediction (as torch's F.normalize)."""
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-12)


class HeadPath:
    """Heads on one set of rows for a rising sequence of strengths C, each fit warm-started from the last (the
    regularisation path): the cheap way to fit many strengths, for cross-validation and for the final refit."""

    def __init__(self, x: np.ndarray, y: np.ndarray, n_classes: int, class_weight: np.ndarray | None = None):
        self.n_classes = n_classes
        self.y = np.asarray(y, np.int64)
        weight = np.ones(n_classes) if class_weight is None else np.asarray(class_weight, np.float64)
        self.sample_weight = weight[self.y] / weight[self.y].sum()  # as torch's cross_entropy(weight=...)
        with _blas_controller().limit(limits=1):  # two BLAS threads beside a busy core: 1.1 s of a first train
            self.coordinates, self.basis = _row_space(normalise_features(x).astype(np.float64))
        self.params = np.zeros(n_classes * (self.coordinates.shape[1] + 1))

    def fit(self, C: float) -> LinearHead:
        """The head at strength C, started from the previous fit on this path."""
        # These matrices are small: a second BLAS thread only adds synchronisation (measured on hymenoptera:
        # 0.09 s on one thread, 0.75 s on two; far worse when the other core is busy).
        with _blas_controller().limit(limits=1):
            self.params = _minimise(self.params, self.coordinates, self.y, self.sample_weight, C, self.n_classes)
        return _unpack(self.params, self.n_classes, self.basis)


@functools.cache
def _blas_controller():
    """threadpoolctl's view of the BLAS libraries loaded (numpy's, and scipy's, imported first): made once, since
    each `threadpool_limits` call scans every loaded library again (4 ms; 0.23 s of a first train's 58 fits)."""
    import scipy.optimize  # noqa: F401  (loads scipy's own BLAS, which L-BFGS-B calls)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def fit_path(x: np.ndarray, y: np.ndarray, n_classes: int, grid, class_weight: np.ndarray | None = None):
    """(C, head) for each C of `grid` in rising order, along one warm-started path."""
    path = HeadPath(x, y, n_classes, class_weight)
    for C in sorted(grid):
        yield C, path.fit(C)


def fit_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, n_classes: int,
             c_grid: tuple[float, ...] = DEFAULT_C_GRID, class_weight: np.ndarray | None = None,
             progress: bool = False) -> HeadFit:
    """Fit the head for each C in `c_grid` and keep the best on the held-out rows (accuracy, then log-loss).

    For a held-out set that only chooses (an inner split): a split that reports must not come here."""
    xv = normalise_features(x_val).astype(np.float64)
    yv = np.asarray(y_val, np.int64)
    from rich.console import Console
    from rich.progress import track

    best, best_score, search = None, None, []
    path = fit_path(x_train, y_train, n_classes, c_grid, class_weight)
    for C, head in track(path, total=len(c_grid), description="fitting head", disable=not progress,
                         console=Console(stderr=True)):
        best, best_score = _score(head, C, xv, yv, search, best, best_score)
    return HeadFit(best, _chosen_c(search, best_score), search)


def _row_space(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x = coordinates @ basis with orthonormal basis rows spanning x's rows (fewer than x's columns when there
    are fewer images than features). The optimal weights lie in that span (the gradients of the loss and of the
    penalty both do) and the penalty is the same in either coordinates, so the smaller problem has the same
    solution, exactly: hymenoptera's 245 images fit in 245 dimensions instead of 1,280."""
    if x.shape[0] >= x.shape[1]:
        return x, np.eye(x.shape[1])
    q, r = np.linalg.qr(x.T)  # x.T = q r: x = r.T q.T (QR: 6x cheaper than an SVD here)
    return r.T, q.T


def _score(head: LinearHead, C: float, xv: np.ndarray, yv: np.ndarray, search: list[dict], best, best_score):
    """Record val accuracy and log-loss of `head` in `search`; return the better of it and the best so far."""
    from scipy.special import log_softmax

    logp = log_softmax(xv @ head.weight.T.astype(np.float64) + head.bias, axis=1)
    acc = float((logp.argmax(1) == yv).mean())
    loss = float(-logp[np.arange(len(yv)), yv].mean())
    search.append({"C": C, "val_accuracy": acc, "val_log_loss": loss})
    if best_score is None or (acc, -loss) > best_score:
        return head, (acc, -loss)
    return best, best_score


def balanced_class_weight(y: np.ndarray, n_classes: int) -> np.ndarray:
    """n / (k * count) per class, as scikit-learn's class_weight='balanced'; all ones when balanced."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    return np.where(counts > 0, len(y) / (n_classes * np.maximum(counts, 1)), 0.0)


def _minimise(start: np.ndarray, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray, C: float,
              n_classes: int) -> np.ndarray:
    """Weighted mean cross-entropy + ||W||^2 / (2 C n), by L-BFGS from `start`; the bias is not penalised."""
    n, dim = x.shape
    onehot = np.eye(n_classes)[y]
    x32 = x.astype(np.float32)  # the two products with x in float32 (half the time); all sums in float64

    from scipy.special import log_softmax

    def loss_and_gradient(params: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = params[:-n_classes].reshape(n_classes, dim), params[-n_classes:]
        logp = log_softmax(x32 @ w.T.astype(np.float32) + b, axis=1)
        loss = -(sample_weight * logp[np.arange(n), y]).sum() + (w * w).sum() / (2 * C * n)
        residual = sample_weight[:, None] * (np.exp(logp) - onehot)
        gradient = np.concatenate([((residual.T.astype(np.float32) @ x32) + w / (C * n)).ravel(),
                                   residual.sum(0)])
        return float(loss), gradient

    from scipy.optimize import minimize  # here: prediction loads LinearHead and must start fast

    result = minimize(loss_and_gradient, start, jac=True, method="L-BFGS-B",
                      options={"maxiter": MAX_ITERATIONS, "maxcor": HISTORY, "gtol": GRADIENT_TOLERANCE})
    return result.x


def _unpack(params: np.ndarray, n_classes: int, basis: np.ndarray) -> LinearHead:
    """The head in feature coordinates, from the parameters in row-space coordinates."""
    weight = params[:-n_classes].reshape(n_classes, basis.shape[0]) @ basis
    return LinearHead(weight.astype(np.float32), params[-n_classes:].astype(np.float32))


def _chosen_c(search: list[dict], score: tuple[float, float]) -> float:
    return next(s["C"] for s in search if (s["val_accuracy"], -s["val_log_loss"]) == score)
