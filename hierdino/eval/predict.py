"""Hierarchical predictions from a run's supervised head: leaf and node probabilities, top-k leaves,
the hierarchical call and its calibration.

Probabilities (``h`` a ``Hierarchy``, leaves in ``h.leaves`` order)::

    p(leaf)  = softmax(W cls + b)                       the head's leaf probabilities
    P(node)  = sum of p over the leaves under the node   P(root) = 1, P(leaf) = p(leaf)

The **hierarchical call** at threshold tau walks down from the root, each time to the child of
highest probability, while that child's probability is at least tau; it stops at the deepest node
so reached (the root: no call, an abstention). P never grows along a root path, so for tau > 0.5
this is exactly "the deepest node whose probability is at least tau" (at most one node per depth
can exceed 0.5); below 0.5 the walk keeps it unambiguous.

A call is **correct** when it agrees with the label at the depth they share: it is the label, one
of its ancestors, or (for a label at an internal node, as external sets give) one of its
descendants. **Calibration** (``calibrate``) picks the smallest tau on a grid whose calls on a
labelled split reach the target precision; the smallest such tau gives the most coverage.
"""

from __future__ import annotations

import logging

import numpy as np

from hierdino.hierarchy import ROOT, Hierarchy

logger = logging.getLogger(__name__)

TAU_GRID = np.round(np.linspace(0.01, 1.0, 100), 2)  # 0.01 ... 1.00
REPORT_TAUS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)


def node_names(h: Hierarchy) -> list[str]:
    """The node order of ``node_probabilities``: the root, then ``h.nodes`` (leaves first)."""
    return [ROOT] + list(h.nodes)


def leaf_probabilities(cls: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``softmax(cls @ weight.T + bias)`` in float64, ``[N, L]``."""
    z = cls.astype(np.float64) @ weight.T.astype(np.float64) + bias
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def node_probabilities(leaf_probs: np.ndarray, h: Hierarchy) -> np.ndarray:
    """``[N, 1 + len(h.nodes)]`` in ``node_names`` order: each node's probability, the sum over its leaves."""
    member = h.leaf_membership().numpy().astype(leaf_probs.dtype)  # [nodes, leaves]
    return np.concatenate([leaf_probs.sum(1, keepdims=True), leaf_probs @ member.T], axis=1)


def top_k(leaf_probs: np.ndarray, h: Hierarchy, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable leaves per row (names ``[N, k]``, probabilities ``[N, k]``), best first."""
    k = min(k, leaf_probs.shape[1])
    idx = np.argsort(-leaf_probs, axis=1, kind="stable")[:, :k]
    return np.asarray(h.leaves, dtype=object)[idx], np.take_along_axis(leaf_probs, idx, axis=1)


def greedy_paths(node_probs: np.ndarray, h: Hierarchy) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the walk from the root to the most probable child at each depth: node names
    ``[N, max_depth]`` (``""`` past a leaf) and their probabilities (-1 past a leaf)."""
    names = node_names(h)
    col = {n: i for i, n in enumerate(names)}
    n = node_probs.shape[0]
    path = np.full((n, h.max_depth), "", dtype=object)
    probs = np.full((n, h.max_depth), -1.0)
    here = np.array([ROOT] * n, dtype=object)
    for d in range(h.max_depth):
        for node in {x for x in here if x}:
            rows = np.flatnonzero(here == node)
            kids = h.children(node)
            if not kids:
                here[rows] = ""
                continue
            p = node_probs[np.ix_(rows, [col[c] for c in kids])]
            best = np.argmax(p, axis=1)
            path[rows, d] = np.asarray(kids, dtype=object)[best]
            probs[rows, d] = p[np.arange(len(rows)), best]
            here[rows] = path[rows, d]
    return path, probs


def hierarchical_call(node_probs: np.ndarray, h: Hierarchy, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The call per row (node names, ``"root"`` for an abstention), its depth and its probability."""
    path, probs = greedy_paths(node_probs, h)
    return _calls(path, probs, tau)


def _calls(path: np.ndarray, probs: np.ndarray, tau: float):
    depth = (probs >= tau).sum(axis=1)  # probabilities never grow down a path
    rows = np.arange(len(depth))
    call = np.where(depth > 0, path[rows, np.maximum(depth - 1, 0)], ROOT)
    prob = np.where(depth > 0, probs[rows, np.maximum(depth - 1, 0)], 1.0)
    return call.astype(object), depth, prob


def _consistent(h: Hierarchy, call: str, label: str) -> bool:
    """``call`` agrees with ``label`` at the depth they share (see the module docstring)."""
    return call == label or call in h.ancestors(label) or label in h.ancestors(call)


def _correct_by_depth(path: np.ndarray, labels, h: Hierarchy) -> np.ndarray:
    """``[N, max_depth]``: the walk's node at each depth is correct for the row's label."""
    out = np.zeros(path.shape, dtype=bool)
    for i, lab in enumerate(labels):
        for d in range(path.shape[1]):
            if path[i, d]:
                out[i, d] = _consistent(h, path[i, d], lab)
    return out


def accuracy_coverage(leaf_probs: np.ndarray, labels, h: Hierarchy, taus=TAU_GRID) -> list[dict]:
    """Per tau: coverage (share of rows with a call), coverage per depth (share called at that depth
    or deeper), precision of the calls, and the share of rows called correctly."""
    path, probs = greedy_paths(node_probabilities(leaf_probs, h), h)
    correct = _correct_by_depth(path, labels, h)
    leaves = set(h.leaves)
    rows, n = [], len(labels)
    for tau in taus:
        call, depth, _ = _calls(path, probs, tau)
        called = depth > 0
        ok = called & correct[np.arange(n), np.maximum(depth - 1, 0)]
        share = (lambda m: float(m.mean()) if n else 0.0)  # noqa: E731
        rows.append({"tau": float(tau), "coverage": share(called),
                     "precision": float(ok.sum() / called.sum()) if called.any() else float("nan"),
                     "correct": share(ok), "leaf_coverage": share(np.array([c in leaves for c in call], dtype=bool)),
                     "coverage_by_depth": {d: share(depth >= d) for d in range(1, h.max_depth + 1)}})
    return rows


def flat_accuracy(leaf_probs: np.ndarray, labels, h: Hierarchy) -> float:
    """Share of rows whose argmax leaf agrees with the label (``_consistent``)."""
    best = np.asarray(h.leaves, dtype=object)[leaf_probs.argmax(1)]
    return float(np.mean([_consistent(h, b, lab) for b, lab in zip(best, labels)])) if len(labels) else float("nan")


def calibrate(leaf_probs: np.ndarray, labels, h: Hierarchy, target: float = 0.95) -> dict:
    """The smallest tau of ``TAU_GRID`` whose calls on these labelled rows reach ``target`` precision,
    with its coverage overall, at leaf depth and per depth; a ``ValueError`` when no tau does."""
    if not 0 < target < 1:
        raise ValueError(f"--target-precision must lie in (0, 1), got {target}")
    unknown = sorted({lab for lab in labels if lab not in h})
    if unknown:
        raise ValueError(f"calibration labels not in the head's tree {h.name!r}: {', '.join(map(str, unknown[:5]))}")
    if not len(labels):
        raise ValueError("the calibration split has no labelled images")
    table = accuracy_coverage(leaf_probs, labels, h)
    ok = [r for r in table if r["precision"] == r["precision"] and r["precision"] >= target]
    if not ok:
        best = max((r for r in table if r["precision"] == r["precision"]), key=lambda r: r["precision"])
        raise ValueError(f"no tau reaches precision {target:g} on the {len(labels)} calibration images (best "
                         f"{best['precision']:.3f} at tau {best['tau']:g}, coverage {best['coverage']:.3f}); "
                         "lower --target-precision")
    chosen = ok[0]
    return dict(chosen, target_precision=target, n=len(labels), flat_accuracy=flat_accuracy(leaf_probs, labels, h))


def coverage_table(leaf_probs: np.ndarray, labels, h: Hierarchy, target: float = 0.95,
                   calib: tuple | None = None) -> dict:
    """What ``jobs/evaluate.py`` reports for a model with a head: the calls' precision and coverage
    at ``REPORT_TAUS`` and at the tau calibrated for ``target`` (on ``calib`` = (leaf_probs, labels),
    the val split, when given; else not calibrated), and the flat argmax accuracy beside them."""
    out = {"flat_accuracy": flat_accuracy(leaf_probs, labels, h), "n": len(labels),
           "rows": accuracy_coverage(leaf_probs, labels, h, REPORT_TAUS), "curve": accuracy_coverage(leaf_probs, labels, h)}
    if calib is not None:
        try:
            tau = calibrate(*calib, h, target)["tau"]
            out["calibrated"] = dict(accuracy_coverage(leaf_probs, labels, h, [tau])[0], target_precision=target)
        except ValueError as e:
            out["calibrated"] = {"error": str(e)}
    return out


def coverage_markdown(model: str, dataset: str, t: dict) -> list[str]:
    """``coverage_table``'s result as Markdown lines."""
    lines = ["", f"Hierarchical calls of `{model}`'s supervised head on {dataset} ({t['n']} images; flat argmax "
             f"leaf accuracy {100 * t['flat_accuracy']:.1f}%):", "",
             "| tau | coverage | leaf coverage | precision of calls |", "|---|---|---|---|"]
    rows = list(t["rows"]) + ([dict(t["calibrated"], tau_label=f"{t['calibrated']['tau']:g} (val, target "
                                    f"{t['calibrated']['target_precision']:g})")] if "tau" in t.get("calibrated", {}) else [])
    for r in rows:
        tau = r.get("tau_label") or f"{r['tau']:g}"
        lines.append(f"| {tau} | {100 * r['coverage']:.1f} | {100 * r['leaf_coverage']:.1f} | {100 * r['precision']:.1f} |")
    if "error" in t.get("calibrated", {}):
        lines.append(f"\ncalibration on val: {t['calibrated']['error']}")
    return lines


def plot_coverage(model: str, dataset: str, t: dict, uri: str) -> str:
    """Precision against coverage of the hierarchical calls as tau varies, the flat argmax as a point."""
    from hierdino.eval.plots import pyplot, save_png  # matplotlib: only when plotting

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    curve = [r for r in t["curve"] if r["coverage"] > 0]
    ax.plot([r["coverage"] for r in curve], [r["precision"] for r in curve], label="hierarchical call (tau varies)")
    ax.plot([r["coverage"] for r in curve], [r["leaf_coverage"] for r in curve], ls=":", label="its leaf coverage")
    ax.scatter([1.0], [t["flat_accuracy"]], color="k", zorder=3, label="flat argmax leaf")
    ax.set(xlabel="coverage", ylabel="precision", title=f"{model} on {dataset}", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.legend(fontsize=7)
    save_png(fig, uri)
    plt.close(fig)
    return uri


def model_head(spec, options=None):
    """The supervised head exported with the model of ``spec`` (a ``features.ModelSpec``), or None."""
    from hierdino.models.head_export import has_head, read_head  # safetensors: only for models with a head

    opts = spec.options or options
    return read_head(spec.weights, None, opts) if spec.kind == "backbone" and has_head(spec.weights, opts) else None


def head_report(head, feats, model: str, dataset: str, split: str, out: str | None = None) -> dict | None:
    """``coverage_table`` of ``head`` on a dataset's features (``features.DatasetFeatures``: CLS first),
    tau calibrated on its val split when ``split`` is another; the plot under ``out`` when given.
    None (said) when the set's labels are not in the head's tree."""
    h, dim = head.hierarchy, head.weight.shape[1]
    x, y = feats.split(split)
    outside = sorted({str(lab) for lab in y if lab not in h})
    if outside or not len(y):
        logger.info(f"note: no hierarchical-call report for {model} on {dataset}: "
                    + (f"labels not in the head's tree {h.name!r}: {', '.join(outside[:5])}" if outside
                       else f"no labelled {split} rows"))
        return None
    probs = lambda z: leaf_probabilities(z[:, :dim], head.weight, head.bias)  # noqa: E731
    xv, yv = feats.split("val") if split != "val" else (x[:0], y[:0])
    t = coverage_table(probs(x), list(y), h, 0.95, (probs(xv), list(yv)) if len(yv) else None)
    t.update(model=model, dataset=dataset)
    if out is not None:
        from hierdino import storage  # pyarrow: only when a plot is written

        t["plot"] = plot_coverage(model, dataset, t, storage.join(out, f"calls_{model}_{dataset}.png"))
    return t
