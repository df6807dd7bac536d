"""Evaluate models side by side on external datasets: probes, metrics with intervals, JSON/Markdown, plots."""

from __future__ import annotations

import json
import logging
import math
import time

from hierdino import storage
from hierdino.data import shards
from hierdino.eval.features import dataset_features, resolve_model
from hierdino.eval.metrics import EncodedPredictions, bootstrap, per_class_recall, tree_feature_spearman
from hierdino.eval.plots import write_plots
from hierdino.eval.predict import coverage_markdown, head_report, model_head
from hierdino.eval.probes import PROBES, PROTOCOLS, run_probe
from hierdino.eval.sets import check_probe_sets, set_hierarchy
from hierdino.logs import PLAIN

logger = logging.getLogger(__name__)


def _scores(y_true: list, y_pred: list, h, bootstrap_n: int, seed: int) -> dict:
    """One probe's predictions scored: metrics with bootstrap intervals, recall per class."""
    point = EncodedPredictions(y_true, y_pred, h).metrics()
    ci = bootstrap(y_true, y_pred, h, bootstrap_n, seed)
    return {"n": len(y_true), "metrics": {k: {"value": v, "ci95": list(ci[k])} for k, v in point.items()},
            "per_class_recall": per_class_recall(y_true, y_pred, bootstrap_n, seed)}


def _say_set_notes(manifest, set_name: str, h, split: str, probes) -> None:
    """What the reader of a set's scores should know: labels nested in the tree, classes absent from
    its train split, k-NN over all of too few rows, logreg without a val split."""
    nested = sorted(f"{a} > {b}" for a in manifest.labels() for b in manifest.labels()
                    if a in h and b in h and a != b and a in h.ancestors(b))
    if nested:  # a probe then separates a node from its own descendants: errors of severity 0
        logger.info(f"note: {set_name} labels both a node and its descendant ({', '.join(nested)}); "
                    "balanced accuracy counts them as different classes")
    unseen = sorted(set(manifest.counts.get(split, {})) - set(manifest.counts.get("train", {})) - {shards.UNLABELED})
    if unseen:  # each caps balanced accuracy: its recall is 0 whatever the features
        logger.info(f"note: {set_name}: {', '.join(unseen)} in its '{split}' split but not in 'train': the probes "
                    f"never predict them")
    n_train = manifest.num_labeled("train")
    clamped = [p for p in probes if p.startswith("knn") and int(p[3:]) > n_train]
    if clamped:  # k-NN over every training row: a majority vote, the same for every image
        logger.info(f"note: {set_name} has {n_train} labelled train rows: {', '.join(clamped)} vote over all of "
                    "them")
    if "logreg" in probes and split != "val" and manifest.num_labeled("val") == 0:
        logger.info(f"note: {set_name} has no labelled 'val' rows: logreg chooses C by cross-validation on 'train'")


def evaluate(models: list[str], datasets: list[str], out: str, split: str = "test", probes: tuple = PROBES,
             bootstrap_n: int = 1000, seed: int = 0, metric: str = "euclidean", patch_mean: bool = False,
             default_img_size: int = 224, plots: bool = True, options=None, keep_predictions: bool = False,
             in_process: bool = False, hierarchies: tuple[str, ...] = (), center_crop: float = 1.0) -> dict:
    """Every model x dataset x probe: metrics with bootstrap intervals; writes results.json, results.md and PNGs.

    ``keep_predictions``: also ``results["predictions"][dataset] = {"y_true": [...], model: {probe: [...]}}``
    on the scored split, written to predictions.json (what paired comparisons resample).
    ``in_process``: features computed in this process, not with Ray Data (``dataset_features``).
    ``hierarchies``: YAML files (or names) of trees that sets' manifests name without holding them.
    ``center_crop``: every model sees the centred share of each side of the images (``crops.center_box``).
    """
    specs = [resolve_model(m, default_img_size, options) for m in models]
    if len({s.name for s in specs}) != len(specs):  # two runs with the same directory name
        specs = [type(s)(**{**s.__dict__, "name": f"{s.name}#{i}"}) for i, s in enumerate(specs)]
    results = {"split": split, "probes": list(probes), "protocols": {p: PROTOCOLS[p] for p in probes if p in PROTOCOLS},
               "bootstrap": bootstrap_n, "seed": seed, "metric": metric,
               "models": {s.name: s.spec for s in specs}, "datasets": {}, "rows": []}
    predictions: dict = {}
    heads = {s.name: model_head(s, options) for s in specs}  # supervised heads exported with runs: hierarchical calls
    cache = storage.join(out, "features")
    per_plot = []
    check_probe_sets(datasets, split, options, hierarchies)  # every set, before any feature is computed
    manifests = [shards.read_manifest(uri, options) for uri in datasets]
    set_names = [m.name for m in manifests]  # two sets with the same name (".../matek/shards", ".../raabin/shards"): #i
    set_names = [f"{n}#{i}" if set_names.count(n) > 1 else n for i, n in enumerate(set_names)]
    for uri, manifest, set_name in zip(datasets, manifests, set_names):
        h = set_hierarchy(manifest, uri, hierarchies)
        results["datasets"][set_name] = {"uri": uri, "hierarchy": h.name, "counts": manifest.counts}
        _say_set_notes(manifest, set_name, h, split, probes)
        for spec in specs:
            t0 = time.time()
            feats = dataset_features(spec, uri, cache, patch_mean, options=options, in_process=in_process,
                                     center=center_crop)
            x_tr, y_tr = feats.split("train")
            x_ev, y_ev = feats.split(split)
            x_val, y_val = feats.split("val") if split != "val" else (None, None)  # val scored: C from train CV
            rho = tree_feature_spearman(x_ev, list(y_ev), h)
            for probe in probes:
                fitted = run_probe(probe, x_tr, y_tr, x_ev, metric, x_val, y_val)
                pred = fitted.predictions
                results["rows"].append(dict(_scores(list(y_ev), list(pred), h, bootstrap_n, seed), model=spec.name,
                                            dataset=set_name, probe=probe, tree_feature_spearman=rho, fit=fitted.info))
                if keep_predictions:
                    kept = predictions.setdefault(set_name, {"y_true": [str(y) for y in y_ev]})
                    kept.setdefault(spec.name, {})[probe] = [str(y) for y in pred]
                if probe == probes[-1]:
                    per_plot.append((spec.name, set_name, h, list(y_ev), list(pred), x_ev, probe))
            if heads[spec.name] is not None and (t := head_report(heads[spec.name], feats, spec.name, set_name, split,
                                                                 out if plots else None)):
                results.setdefault("hierarchical_calls", []).append(t)
            logger.info(f"  {spec.name} x {set_name}: {time.time() - t0:.1f}s", extra=PLAIN)
    storage.write_bytes(storage.join(out, "results.json"), json_text(results).encode())
    storage.write_bytes(storage.join(out, "results.md"), markdown_table(results).encode())
    if keep_predictions:
        storage.write_bytes(storage.join(out, "predictions.json"), json.dumps(predictions).encode())
        results["predictions"] = predictions
    if plots:
        results["plots"] = write_plots(per_plot, out)
    return results


def json_text(obj) -> str:
    """``obj`` as strict JSON: a value that is not finite (a rank correlation over fewer than 3
    classes is NaN) is written ``null``, which every JSON reader takes (``NaN`` is not JSON)."""
    def finite(x):
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x
    return json.dumps(finite(obj), indent=2, allow_nan=False)


def _cell(m: dict, pct: bool = True) -> str:
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.2f}")
    return f"{f(m['value'])} [{f(m['ci95'][0])}, {f(m['ci95'][1])}]"


def markdown_table(results: dict) -> str:
    probes = results["probes"]
    lines = [f"# Evaluation on the **{results['split']}** splits",
             "", f"Balanced accuracy (%) with bootstrap 95% intervals ({results['bootstrap']} resamples); mistake "
             f"severity and lineage bAcc of the `{probes[-1]}` probe.", "",
             "| model | dataset | " + " | ".join(f"bAcc {p}" for p in probes) + " | severity | lineage bAcc | hF1 |",
             "|---|---|" + "---|" * (len(probes) + 3)]
    protocols = results.get("protocols", {})
    notes = [f"- `{p}`: {protocols[p]}" for p in probes if p in protocols]
    rows = results["rows"]
    keys = sorted({(r["model"], r["dataset"]) for r in rows}, key=lambda k: (k[1], k[0]))
    for model, dataset in keys:
        by_probe = {r["probe"]: r for r in rows if r["model"] == model and r["dataset"] == dataset}
        last = by_probe[probes[-1]]["metrics"]
        lines.append(f"| {model} | {dataset} | " + " | ".join(_cell(by_probe[p]["metrics"]["bacc"]) for p in probes)
                     + f" | {_cell(last['severity'], False)} | {_cell(last['lineage_bacc'])} | {_cell(last['hF1'])} |")
    calls = [x for t in results.get("hierarchical_calls", []) for x in coverage_markdown(t["model"], t["dataset"], t)]
    return "\n".join(lines + ([""] + notes if notes else []) + _per_class_lines(rows, probes[-1]) + calls) + "\n"


def _per_class_lines(rows: list[dict], probe: str) -> list[str]:
    """Per dataset, the recall (%) of each class under ``probe``, one column per model."""
    lines = []
    for dataset in sorted({r["dataset"] for r in rows}):
        by_model = {r["model"]: r["per_class_recall"] for r in rows
                    if r["dataset"] == dataset and r["probe"] == probe and "per_class_recall" in r}
        if not by_model:
            continue
        classes = sorted({c for per in by_model.values() for c in per})
        lines += ["", f"Recall per class (%) of `{probe}` on {dataset}, 95% intervals over the class's images:", "",
                  "| class | n | " + " | ".join(by_model) + " |", "|---|---|" + "---|" * len(by_model)]
        for c in classes:
            n = next(per[c]["n_images"] for per in by_model.values() if c in per)
            lines.append(f"| {c} | {n} | " + " | ".join(_cell(per[c]) if c in per else "-" for per in by_model.values()) + " |")
    return lines
