"""Classification and hierarchical metrics, with seeded bootstrap intervals.

Flat: accuracy, balanced accuracy, weighted F1 (scikit-learn). Hierarchical, against a tree whose
leaves are the classes:

- mistake severity: over errors, the tree distance from the true leaf up to the lowest common
  ancestor of the true and predicted leaves (``depth(true) - depth(lca)``), averaged;
- hierarchical precision / recall / F1 on ancestor sets ``A(x)`` = the root path of x (root
  excluded, x included): ``hP = sum |A(pred) & A(true)| / sum |A(pred)|``, ``hR = ... / sum |A(true)|``;
- lineage balanced accuracy: balanced accuracy after mapping both to their depth-1 ancestor;
- Spearman correlation between the tree distance of two classes and the distance of their
  feature centroids (over all class pairs).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from hierdino.hierarchy import Hierarchy


def flat_metrics(y_true, y_pred) -> dict[str, float]:
    return {
        "acc": float(accuracy_score(y_true, y_pred)),
        "bacc": float(balanced_accuracy_score(y_true, y_pred)),
        "f1w": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
    }


def mistake_severity(y_true: list[str], y_pred: list[str], h: Hierarchy) -> tuple[float, list[int]]:
    """Mean ``depth(true) - depth(lca(true, pred))`` over errors (0.0 when there are none), and each error's value."""
    per = [h.depth(t) - h.depth(h.lca(t, p)) for t, p in zip(y_true, y_pred) if t != p]
    return (float(np.mean(per)) if per else 0.0), per


def hierarchical_prf(y_true: list[str], y_pred: list[str], h: Hierarchy) -> dict[str, float]:
    inter = n_pred = n_true = 0
    for t, p in zip(y_true, y_pred):
        at, ap = set(h.path(t)), set(h.path(p))
        inter += len(at & ap)
        n_pred += len(ap)
        n_true += len(at)
    hp, hr = inter / n_pred, inter / n_true
    return {"hP": hp, "hR": hr, "hF1": 2 * hp * hr / (hp + hr) if hp + hr else 0.0}


def lineage_bacc(y_true: list[str], y_pred: list[str], h: Hierarchy) -> float:
    return float(balanced_accuracy_score([h.at_depth(t, 1) for t in y_true], [h.at_depth(p, 1) for p in y_pred]))


def tree_feature_spearman(features: np.ndarray, labels: list[str], h: Hierarchy) -> float:
    """Spearman rho between tree distance and class-centroid Euclidean distance over class pairs."""
    classes = sorted(set(labels))
    if len(classes) < 3:
        return float("nan")
    lab = np.asarray(labels)
    cent = np.stack([features[lab == c].mean(0) for c in classes])
    tree, feat = [], []
    for i in range(len(classes)):
        for j in range(i + 1, len(classes)):
            tree.append(h.distance(classes[i], classes[j]))
            feat.append(float(np.linalg.norm(cent[i] - cent[j])))
    return float(spearmanr(tree, feat).statistic)


def all_metrics(y_true: list[str], y_pred: list[str], h: Hierarchy) -> dict[str, float]:
    out = flat_metrics(y_true, y_pred)
    out["severity"] = mistake_severity(y_true, y_pred, h)[0]
    out.update(hierarchical_prf(y_true, y_pred, h))
    out["lineage_bacc"] = lineage_bacc(y_true, y_pred, h)
    return out


def _bacc(t: np.ndarray, p: np.ndarray, n_classes: int) -> float:
    support = np.bincount(t, minlength=n_classes)
    tp = np.bincount(t[t == p], minlength=n_classes)
    present = support > 0
    return float((tp[present] / support[present]).mean())


def _f1_weighted(t: np.ndarray, p: np.ndarray, n_classes: int) -> float:
    support = np.bincount(t, minlength=n_classes)
    predicted = np.bincount(p, minlength=n_classes)
    tp = np.bincount(t[t == p], minlength=n_classes)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
    return float((f1 * support).sum() / support.sum())


class EncodedPredictions:
    """Per-sample integer and count arrays so that every metric of a resample is a few numpy reductions."""

    def __init__(self, y_true: list[str], y_pred: list[str], h: Hierarchy):
        classes = sorted(set(y_true) | set(y_pred))
        code = {c: i for i, c in enumerate(classes)}
        self.t = np.array([code[x] for x in y_true])
        self.p = np.array([code[x] for x in y_pred])
        self.n_classes = len(classes)
        self.severity = np.array([h.depth(t) - h.depth(h.lca(t, p)) for t, p in zip(y_true, y_pred)], float)
        self.inter = np.array([len(set(h.path(t)) & set(h.path(p))) for t, p in zip(y_true, y_pred)], float)
        self.n_pred = np.array([len(h.path(p)) for p in y_pred], float)
        self.n_true = np.array([len(h.path(t)) for t in y_true], float)
        lineages = sorted({h.at_depth(x, 1) for x in classes})
        lcode = {c: i for i, c in enumerate(lineages)}
        self.lt = np.array([lcode[h.at_depth(x, 1)] for x in y_true])
        self.lp = np.array([lcode[h.at_depth(x, 1)] for x in y_pred])
        self.n_lineages = len(lineages)

    def metrics(self, idx: np.ndarray | None = None) -> dict[str, float]:
        idx = np.arange(len(self.t)) if idx is None else idx
        t, p = self.t[idx], self.p[idx]
        err = t != p
        hp, hr = self.inter[idx].sum() / self.n_pred[idx].sum(), self.inter[idx].sum() / self.n_true[idx].sum()
        return {
            "acc": float((~err).mean()),
            "bacc": _bacc(t, p, self.n_classes),
            "f1w": _f1_weighted(t, p, self.n_classes),
            "severity": float(self.severity[idx][err].mean()) if err.any() else 0.0,
            "hP": float(hp), "hR": float(hr), "hF1": float(2 * hp * hr / (hp + hr)) if hp + hr else 0.0,
            "lineage_bacc": _bacc(self.lt[idx], self.lp[idx], self.n_lineages),
        }


def bootstrap(y_true: list[str], y_pred: list[str], h: Hierarchy, n: int = 1000, seed: int = 0,
              alpha: float = 0.05) -> dict[str, tuple[float, float]]:
    """Percentile ``1 - alpha`` intervals of every metric of ``all_metrics`` over ``n`` seeded resamples of the scored split."""
    enc = EncodedPredictions(y_true, y_pred, h)
    rng = np.random.default_rng(seed)
    m = len(enc.t)
    samples: dict[str, list[float]] = {}
    for _ in range(n):
        for k, v in enc.metrics(rng.integers(0, m, m)).items():
            samples.setdefault(k, []).append(v)
    return {k: (float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))) for k, v in samples.items()}


def per_class_recall(y_true: list[str], y_pred: list[str], n: int = 1000, seed: int = 0,
                     alpha: float = 0.05) -> dict[str, dict]:
    """Recall of each true class (the share of its images predicted as it), with the percentile
    ``1 - alpha`` interval over ``n`` seeded resamples of that class's images; ``n_images`` beside.
    Balanced accuracy is their mean: this is where a pooled score's gain or loss sits."""
    rng = np.random.default_rng(seed)
    t, p = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    out = {}
    for c in sorted(set(y_true)):
        hit = (p[t == c] == c).astype(float)
        draws = hit[rng.integers(0, len(hit), (n, len(hit)))].mean(1) if n > 0 else np.array([np.nan])
        out[c] = {"value": float(hit.mean()), "ci95": [float(np.quantile(draws, alpha / 2)),
                                                       float(np.quantile(draws, 1 - alpha / 2))],
                  "n_images": int(len(hit))}
    return out


def pooled_bacc_interval(sets: list[tuple[list, list]], n: int = 1000, seed: int = 0,
                         alpha: float = 0.05) -> tuple[float, float, float]:
    """The mean over datasets of balanced accuracy, and its percentile ``1 - alpha`` interval.

    ``sets``: ``(y_true, y_pred)`` per dataset. Each resample draws every dataset's scored images
    with replacement, independently (the datasets are independent samples), and averages their
    balanced accuracies; the interval is the spread of that mean over ``n`` seeded resamples.
    """
    encoded = []
    for y_true, y_pred in sets:
        classes = sorted(set(y_true) | set(y_pred))
        code = {c: i for i, c in enumerate(classes)}
        encoded.append((np.array([code[x] for x in y_true]), np.array([code[x] for x in y_pred]), len(classes)))
    if not encoded:
        return float("nan"), float("nan"), float("nan")
    point = float(np.mean([_bacc(t, p, k) for t, p, k in encoded]))
    if n <= 0:
        return point, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n):
        vals = []
        for t, p, k in encoded:
            idx = rng.integers(0, len(t), len(t))
            vals.append(_bacc(t[idx], p[idx], k))
        means.append(np.mean(vals))
    return point, float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def paired_bootstrap(sizes: list[int], scores_x: list[list], scores_y: list[list], n: int = 1000, seed: int = 0,
                     alpha: float = 0.05) -> dict:
    """Paired bootstrap of a metric difference X - Y over scored images, several datasets and seeds.

    ``sizes[d]``: images of dataset d; ``scores_x[d][s]`` (and ``scores_y``): a function of an index
    array of dataset d's images -> the metric of X's (Y's) seed-s run on those images. Statistic:

        D = mean over seeds s of  mean over datasets d of  score_x[d][s](I_d) - score_y[d][s](I_d)

    with I_d all images for the point value; each resample draws I_d with replacement once per
    dataset and scores both models and every seed on it (the pairing), datasets independently.
    Returns the point value, the percentile ``1 - alpha`` interval, the bootstrap standard error
    and the per-seed point differences.
    """
    def statistic(idx_per_set) -> np.ndarray:
        return np.mean([[fx(idx) - fy(idx) for fx, fy in zip(xs, ys)]
                        for xs, ys, idx in zip(scores_x, scores_y, idx_per_set)], axis=0)  # one value per seed

    for xs, ys in zip(scores_x, scores_y):
        if len(xs) != len(ys) or not xs:
            raise ValueError(f"paired bootstrap needs the same seeds on both sides, got {len(xs)} and {len(ys)}")
    per_seed = statistic([np.arange(m) for m in sizes])
    rng = np.random.default_rng(seed)
    draws = [float(statistic([rng.integers(0, m, m) for m in sizes]).mean()) for _ in range(n)]
    return {"diff": float(per_seed.mean()), "ci95": (float(np.quantile(draws, alpha / 2)), float(np.quantile(draws, 1 - alpha / 2))),
            "se": float(np.std(draws, ddof=1)), "per_seed": [float(v) for v in per_seed]}


def paired_bacc_difference(sets: list[tuple[list, list[list], list[list]]], n: int = 1000, seed: int = 0,
                           alpha: float = 0.05) -> dict:
    """``paired_bootstrap`` of balanced accuracy. ``sets``: one ``(y_true, preds_x, preds_y)`` per dataset,
    where ``preds_x[s]`` and ``preds_y[s]`` are the seed-``s`` runs' predictions for the same images.

    When the two models err on the same images, their bAcc move together across resamples and the
    paired interval is narrower than two separate intervals would suggest.
    """
    sizes, scores_x, scores_y = [], [], []
    for y_true, preds_x, preds_y in sets:
        labels = sorted(set(y_true).union(*preds_x, *preds_y))
        code = {c: i for i, c in enumerate(labels)}
        t = np.array([code[v] for v in y_true])

        def scorer(pred, t=t, k=len(labels)):
            p = np.array([code[v] for v in pred])
            return lambda idx: _bacc(t[idx], p[idx], k)

        sizes.append(len(t))
        scores_x.append([scorer(p) for p in preds_x])
        scores_y.append([scorer(p) for p in preds_y])
    return paired_bootstrap(sizes, scores_x, scores_y, n, seed, alpha)


def paired_severity_difference(sets: list[tuple[list, list[list], list[list]]], trees: list[Hierarchy], n: int = 1000,
                               seed: int = 0, alpha: float = 0.05) -> dict:
    """``paired_bootstrap`` of mistake severity (mean tree distance from the true leaf to the LCA over the
    errors; lower is milder). ``sets`` as in ``paired_bacc_difference``; ``trees[d]``: dataset d's hierarchy."""
    def scorer(y_true, pred, h):
        enc = EncodedPredictions(y_true, pred, h)
        err = enc.t != enc.p

        def score(idx):
            e = err[idx]
            return float(enc.severity[idx][e].mean()) if e.any() else 0.0
        return score

    return paired_bootstrap([len(s[0]) for s in sets], [[scorer(s[0], p, h) for p in s[1]] for s, h in zip(sets, trees)],
                            [[scorer(s[0], p, h) for p in s[2]] for s, h in zip(sets, trees)], n, seed, alpha)
