"""Probes on frozen features: k-NN (k = 1, 20; Euclidean as the paper, cosine optional) and
logistic regression (lbfgs, ``max_iter=1000``, ``C = feature_dim * n_classes / 100`` as the paper),
fit on a dataset's ``train`` split and scored on ``val`` or ``test``."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

PROBES = ("knn1", "knn20", "logreg")


def fit_predict(probe: str, x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    """Predictions of ``probe`` for ``x_eval`` after fitting on the training features, as DinoBloom's
    and the paper's evaluation: majority vote of the k nearest (uniform weights), and logistic
    regression on the raw features."""
    if probe.startswith("knn"):
        k = int(probe[3:])
        if metric not in ("euclidean", "cosine"):
            raise ValueError(f"k-NN metric must be euclidean or cosine, got {metric!r}")
        clf = KNeighborsClassifier(n_neighbors=min(k, len(x_train)), metric=metric)
        return clf.fit(x_train, y_train).predict(x_eval)
    if probe == "logreg":
        n_classes = len(np.unique(y_train))
        clf = LogisticRegression(C=x_train.shape[1] * n_classes / 100, max_iter=1000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter is reported as is by the paper too
            clf.fit(x_train, y_train)
        return clf.predict(x_eval)
    raise ValueError(f"unknown probe {probe!r}; probes: {', '.join(PROBES)}")
