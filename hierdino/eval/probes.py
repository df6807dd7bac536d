"""Probes on frozen features, fit on a dataset's ``train`` split and scored on ``val`` or ``test``.

- ``knn1``, ``knn20``: k-NN majority vote (uniform weights), Euclidean as the paper (cosine optional).
- ``logreg``: logistic regression (lbfgs, L2) on features standardised with the train split's
  per-feature mean and standard deviation, with C chosen from ``C_GRID`` by balanced accuracy on the
  ``val`` split; when ``val`` is the split being scored, or a set has none, C is chosen by stratified
  ``CV_FOLDS``-fold cross-validation on the train split instead (see ``fit_logreg``). The result does
  not depend on the features' scale or offset, per feature.
- ``logreg_raw``: the paper's and DinoBloom's protocol, for comparison with their numbers: the raw
  features, ``C = feature_dim * n_classes / 100``, ``max_iter=1000``. On features that vary only in
  a tiny subspace around a large constant (a random backbone's CLS tokens) the penalty outweighs
  their differences and it predicts one class.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier

PROBES = ("knn1", "knn20", "logreg")       # what reports run unless told otherwise
ALL_PROBES = PROBES + ("logreg_raw",)      # every probe a report or a config may name

# C on standardised features: 15 values, half a decade apart, 1e-5..100. At the low end the penalty
# outweighs a few thousand rows (the weights shrink to the class-mean directions, then to the priors);
# beyond 100 the fit is practically unpenalised and lbfgs only runs longer. DINOv2 sweeps 45 values
# over 1e-6..1e5 with a GPU solver on raw features (whose scale moves the useful range); standardised,
# the range is known, and 15 warm-started fits cost a few seconds per model and set on 2 CPU cores
# (three times that with cross-validation), where 45 cold fits at a tight tolerance take minutes.
C_GRID = tuple(float(c) for c in 10.0 ** np.linspace(-5, 2, 15))
CV_FOLDS = 3      # folds of the train split when C cannot be chosen on val
MAX_ITER = 1000
# scikit-learn's default (DINOv2: 1e-12 with cuML, float64). On a random backbone's synth-ood features
# 1e-6 moved val bAcc by at most 1 point per C and took 4x as long (its large-C fits hit MAX_ITER).
TOL = 1e-4

PROTOCOLS = {
    "knn1": "k-NN, k = 1 (majority vote of the nearest training rows)",
    "knn20": "k-NN, k = 20 (majority vote of the nearest training rows, uniform weights)",
    "logreg": f"logistic regression on features standardised with the train split's mean and s.d., C chosen from "
              f"{len(C_GRID)} values in [{C_GRID[0]:g}, {C_GRID[-1]:g}] by balanced accuracy on the val split "
              f"(on {CV_FOLDS}-fold CV of the train split when val is the scored split or missing)",
    "logreg_raw": "logistic regression on the raw features, C = feature dim x classes / 100 (the paper's and "
                  "DinoBloom's protocol)",
}


@dataclass
class ProbeResult:
    """A probe's predictions for the scored rows and how it was fit (``info``: e.g. the C chosen and where)."""

    predictions: np.ndarray
    info: dict = field(default_factory=dict)


def standardiser(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale of the training features (float64); a feature constant on the
    train split gets scale 1, so it stays constant (zero) instead of dividing by zero."""
    x = np.asarray(x_train, np.float64)
    mean, std = x.mean(0), x.std(0)
    return mean, np.where(std > 0, std, 1.0)


def standardise(x: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(x - mean) / scale`` in float64."""
    return (np.asarray(x, np.float64) - mean) / scale


def _bacc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Balanced accuracy; predictions of classes absent from ``y_true`` just count as errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        return float(balanced_accuracy_score(y_true, y_pred))


def _fit(clf: LogisticRegression, x: np.ndarray, y: np.ndarray) -> LogisticRegression:
    """``clf`` fit on ``x, y``; a ConvergenceWarning at ``max_iter`` is not an error (the paper reports as is)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return clf.fit(x, y)


def c_path(x_fit: np.ndarray, y_fit: np.ndarray, x_score: np.ndarray, y_score: np.ndarray,
           grid=C_GRID) -> tuple[list[float], list[LogisticRegression]]:
    """Balanced accuracy on ``(x_score, y_score)`` of a regression fit on ``(x_fit, y_fit)`` at each C of
    ``grid`` (ascending), and the fitted models. Each fit starts from the previous C's solution (warm
    start): the objective is strictly convex, so this changes the cost, not the solution."""
    clf = LogisticRegression(max_iter=MAX_ITER, tol=TOL, warm_start=True)
    scores, models = [], []
    for c in grid:
        _fit(clf.set_params(C=c), x_fit, y_fit)
        scores.append(_bacc(y_score, clf.predict(x_score)))
        models.append(copy.deepcopy(clf))
    return scores, models


def cv_scores(x: np.ndarray, y: np.ndarray, grid=C_GRID, folds: int = CV_FOLDS, seed: int = 0) -> np.ndarray | None:
    """Mean balanced accuracy over stratified folds of ``(x, y)`` at each C of ``grid``; None when the
    rows are too few for two folds (no class with two rows)."""
    folds = min(folds, int(np.unique(y, return_counts=True)[1].max()))
    if folds < 2:
        return None
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    per_fold = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the least populated class has only 1 member"
        splits = list(splitter.split(x, y))
    for fit_idx, score_idx in splits:
        if len(np.unique(y[fit_idx])) < 2:  # a fold of one class cannot be fit
            continue
        per_fold.append(c_path(x[fit_idx], y[fit_idx], x[score_idx], y[score_idx], grid)[0])
    return np.mean(per_fold, axis=0) if per_fold else None


def fit_logreg(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, x_val: np.ndarray | None = None,
               y_val: np.ndarray | None = None, grid=C_GRID) -> ProbeResult:
    """The ``logreg`` probe: standardise with the train split's statistics, choose C, predict ``x_eval``.

    With labelled ``x_val, y_val`` (the caller passes them only when ``val`` is not the split being
    scored), C is the grid value with the best val balanced accuracy (the smallest C on a tie) and the
    model fit on train at that C predicts. Without them (``val`` is scored: choosing C on it would
    leak, and sweeps score ``val``; or the set has no ``val`` rows), C comes from stratified
    ``CV_FOLDS``-fold cross-validation on the train split, then the model is fit on all of train.
    ``info``: the C chosen, where from, and the balanced accuracy per grid value."""
    mean, scale = standardiser(x_train)
    x_tr, x_ev = standardise(x_train, mean, scale), standardise(x_eval, mean, scale)
    if x_val is not None and len(x_val):
        scores, models = c_path(x_tr, y_train, standardise(x_val, mean, scale), y_val, grid)
        best = int(np.argmax(scores))
        info = {"C": grid[best], "C_from": "val", "C_scores": [float(s) for s in scores]}
        return ProbeResult(models[best].predict(x_ev), info)
    scores = cv_scores(x_tr, y_train, grid)
    if scores is None:  # a class with two rows is needed for any held-out choice
        c, info = 1.0, {"C": 1.0, "C_from": "default (too few train rows for cross-validation)"}
    else:
        c = grid[int(np.argmax(scores))]
        info = {"C": c, "C_from": f"train {CV_FOLDS}-fold CV", "C_scores": [float(s) for s in scores]}
    clf = _fit(LogisticRegression(C=c, max_iter=MAX_ITER, tol=TOL), x_tr, y_train)
    return ProbeResult(clf.predict(x_ev), info)


def fit_logreg_raw(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray) -> ProbeResult:
    """The ``logreg_raw`` probe, the paper's: raw features, ``C = dim * n_classes / 100``, lbfgs, ``max_iter=1000``."""
    c = x_train.shape[1] * len(np.unique(y_train)) / 100
    clf = _fit(LogisticRegression(C=c, max_iter=MAX_ITER), x_train, y_train)
    return ProbeResult(clf.predict(x_eval), {"C": c, "C_from": "dim x classes / 100"})


def fit_knn(k: int, x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, metric: str = "euclidean") -> ProbeResult:
    """Majority vote of the ``k`` nearest training rows (all of them when there are fewer)."""
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"k-NN metric must be euclidean or cosine, got {metric!r}")
    clf = KNeighborsClassifier(n_neighbors=min(k, len(x_train)), metric=metric)
    return ProbeResult(clf.fit(x_train, y_train).predict(x_eval), {"k": k, "metric": metric})


def run_probe(probe: str, x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, metric: str = "euclidean",
              x_val: np.ndarray | None = None, y_val: np.ndarray | None = None) -> ProbeResult:
    """``probe`` fit on the training features, its predictions for ``x_eval`` and how it was fit.
    ``x_val, y_val``: the labelled val rows, used by ``logreg`` to choose C; pass them only when
    ``x_eval`` is not the val split itself."""
    if probe.startswith("knn") and probe[3:].isdigit():
        return fit_knn(int(probe[3:]), x_train, y_train, x_eval, metric)
    if probe == "logreg":
        return fit_logreg(x_train, y_train, x_eval, x_val, y_val)
    if probe == "logreg_raw":
        return fit_logreg_raw(x_train, y_train, x_eval)
    raise ValueError(f"unknown probe {probe!r}; probes: {', '.join(ALL_PROBES)}")


def fit_predict(probe: str, x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, metric: str = "euclidean",
                x_val: np.ndarray | None = None, y_val: np.ndarray | None = None) -> np.ndarray:
    """Predictions of ``probe`` for ``x_eval`` (``run_probe`` without the fit's details)."""
    return run_probe(probe, x_train, y_train, x_eval, metric, x_val, y_val).predictions
