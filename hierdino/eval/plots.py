"""PNG plots of an evaluation: confusion matrices in tree order, 2-D PCA embeddings coloured by
lineage, mistake-severity histograms."""

from __future__ import annotations

import io

import numpy as np

from hierdino import storage


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display on cluster nodes)."""
    import matplotlib  # optional plotting backend, loaded only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use("Agg"), and only when plotting

    return plt


def save_png(fig, uri: str, dpi: int = 110) -> str:
    """``fig`` as a PNG at ``uri``: rendered to bytes, then written atomically (``storage.write_bytes``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    storage.write_bytes(uri, buf.getvalue())
    return uri


def tree_order(h, labels: set) -> list[str]:
    """``labels`` (leaves or internal nodes: external sets label at their own depth) in the tree's
    order: by the first leaf under each, a node before its descendants."""
    leaf_pos = {leaf: i for i, leaf in enumerate(h.leaves)}
    return sorted(labels, key=lambda n: (min(leaf_pos[x] for x in h.leaves_under(n)), h.depth(n)))


def write_plots(items, out: str) -> list[str]:
    """``items``: (model, dataset, hierarchy, y_true, y_pred, features, probe) tuples."""
    plt = pyplot()
    from sklearn.decomposition import PCA  # scikit-learn: heavy, and callers of pyplot() alone do not need it
    from sklearn.metrics import confusion_matrix  # scikit-learn: heavy, as above

    from hierdino.eval.metrics import mistake_severity  # imports scikit-learn (heavy), as above

    written = []
    severity: dict[str, list] = {}
    for model, dataset, h, y_true, y_pred, feats, probe in items:
        classes = tree_order(h, set(y_true) | set(y_pred))
        cm = confusion_matrix(y_true, y_pred, labels=classes, normalize="true")
        fig, ax = plt.subplots(figsize=(0.35 * len(classes) + 3, 0.35 * len(classes) + 2.5))
        ax.imshow(np.nan_to_num(cm), cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{model} on {dataset} ({probe}), rows normalised, tree order", fontsize=9)
        written.append(save_png(fig, storage.join(out, "plots", f"confusion-{model}-{dataset}.png")))
        plt.close(fig)

        z = PCA(2, random_state=0).fit_transform(feats) if len(feats) > 2 else np.zeros((len(feats), 2))
        lineages = [h.at_depth(y, 1) for y in y_true]
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        for lin in sorted(set(lineages)):
            sel = np.array([x == lin for x in lineages])
            ax.scatter(z[sel, 0], z[sel, 1], s=6, label=lin)
        ax.legend(fontsize=7, markerscale=2)
        ax.set_title(f"{model} on {dataset}: PCA of features by lineage", fontsize=9)
        written.append(save_png(fig, storage.join(out, "plots", f"embedding-{model}-{dataset}.png")))
        plt.close(fig)
        severity.setdefault(dataset, []).append((model, mistake_severity(y_true, y_pred, h)[1]))
    for dataset, per_model in severity.items():
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        top = max([max(v) for _, v in per_model if v] + [1])
        bins = np.arange(-0.5, top + 1.5)  # severity 0: a prediction below the true node (sets of mixed depth)
        ax.hist([v for _, v in per_model], bins=bins, label=[m for m, _ in per_model])
        ax.set_xlabel("mistake severity (edges from true leaf to LCA)")
        ax.set_ylabel("errors")
        ax.legend(fontsize=7)
        ax.set_title(f"mistake severity on {dataset}", fontsize=9)
        written.append(save_png(fig, storage.join(out, "plots", f"severity-{dataset}.png")))
        plt.close(fig)
    return written
