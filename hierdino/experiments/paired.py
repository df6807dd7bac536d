"""The v2 comparison (issue #16): its variants, paired contrasts over test images, and its report.

Every contrast X - Y is the seed-paired difference in balanced accuracy, its interval from a paired
bootstrap over the scored images (``hierdino.eval.metrics.paired_bacc_difference``: the same
resampled images for both models and every seed), per external dataset and pooled over the three.
The minimum detectable effect of a contrast is ``MDE_FACTOR`` x its bootstrap standard error: the
true difference that a two-sided 5% test detects with 80% power, (1.96 + 0.84) x SE.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hierdino.data.suite import EXTERNAL_SETS
from hierdino.eval.metrics import paired_bacc_difference, paired_severity_difference
from hierdino.experiments.compare import table_foot, table_head, variant_rows

VARIANTS = {"ssl": "(a) SSL only", "flat": "(b) flat CE", "hxe-path": "(c) HXE alpha=0.5, path",
            "hxe-tree": "(c') HXE alpha=0.5, tree", "hxe-sweep": "(d) HXE swept level weights"}
CONTRASTS = (("hxe-path", "flat"), ("hxe-tree", "flat"), ("hxe-sweep", "flat"), ("hxe-path", "hxe-tree"),
             ("flat", "ssl"), ("hxe-path", "ssl"))
POOLED = "pooled"
MDE_FACTOR = 1.96 + 0.84


def run_name(uri: str) -> str:
    """The model name an evaluation report gives a run directory: its last path component."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _sets(predictions: dict, runs: dict, x: str, y: str, probe: str, datasets: Sequence[str]) -> list:
    """``(y_true, [x's predictions per seed], [y's per seed])`` per dataset, seeds in the same order."""
    out = []
    for ds in datasets:
        p = predictions[ds]
        out.append((p["y_true"], [p[run_name(u)][probe] for u in runs[x]], [p[run_name(u)][probe] for u in runs[y]]))
    return out


def paired_contrasts(predictions: dict, runs: dict, probes: Sequence[str], contrasts=CONTRASTS,
                     n: int = 1000, seed: int = 0, hierarchies: dict | None = None,
                     groups: dict[str, Sequence[str]] | None = None) -> list[dict]:
    """Every contrast x probe x group of datasets: the paired bootstrap's result and its MDE.

    ``predictions``: ``evaluate(..., keep_predictions=True)["predictions"]``; ``runs``: variant -> run
    URIs, seed-ordered alike for every variant. ``groups``: row name -> the datasets it pools
    (default: each external set alone, then the three ``POOLED``). Rows of ``metric`` "bacc"; with
    ``hierarchies`` (dataset -> its tree) also "severity" rows for the last probe. Contrasts whose
    variants did not both run are skipped.
    """
    groups = groups or {**{d: (d,) for d in EXTERNAL_SETS}, POOLED: EXTERNAL_SETS}
    rows = []
    for x, y in contrasts:
        if x not in runs or y not in runs:
            continue
        for metric, probe in [("bacc", p) for p in probes] + ([("severity", probes[-1])] if hierarchies else []):
            for ds, datasets in groups.items():
                if metric == "bacc":
                    r = paired_bacc_difference(_sets(predictions, runs, x, y, probe, datasets), n, seed)
                else:
                    r = paired_severity_difference(_sets(predictions, runs, x, y, probe, datasets),
                                                   [hierarchies[d] for d in datasets], n, seed)
                rows.append({"x": x, "y": y, "metric": metric, "probe": probe, "dataset": ds, **r, "mde": MDE_FACTOR * r["se"]})
    return rows


def _pct(v: float) -> str:
    return f"{100 * v:+.1f}"


def contrast_cell(r: dict) -> str:
    """'+1.2 [-0.3, +2.6] sd 0.8, 2/3' (pp): the paired difference, its interval over test images, the s.d.
    of the per-seed differences and the seeds where X is ahead; bold when the interval excludes 0."""
    seeds = r["per_seed"]
    sd = f" sd {100 * float(np.std(seeds, ddof=1)):.1f}," if len(seeds) > 1 else ""
    text = f"{_pct(r['diff'])} [{_pct(r['ci95'][0])}, {_pct(r['ci95'][1])}]{sd} {sum(v > 0 for v in seeds)}/{len(seeds)}"
    return f"**{text}**" if r["ci95"][0] > 0 or r["ci95"][1] < 0 else text


def contrast_table(summary: dict, probes: Sequence[str]) -> list[str]:
    """Markdown: the paired differences per contrast and probe, one column per dataset and pooled."""
    rows = [r for r in summary.get("paired", []) if r.get("metric", "bacc") == "bacc"]
    if not rows:
        return []
    cols = (*EXTERNAL_SETS, POOLED)
    lines = ["", "## Paired differences X - Y", "",
             "Balanced accuracy, percentage points: mean over seeds of the seed-paired difference, the paired "
             "bootstrap 95% interval over test images (the same images for both models), the s.d. of the "
             "per-seed differences and the seeds where X is ahead. **Bold**: the interval excludes 0. The "
             "interval covers the sampling of test images; the seed s.d. shows the training noise that it "
             "does not cover (3 seeds are too few to resample).", "",
             "| X - Y | probe | " + " | ".join(cols) + " | MDE pooled |", "|---|---|" + "---|" * (len(cols) + 1)]
    variants = summary["variants"]
    for x, y in CONTRASTS:
        for p in probes:
            cells = {r["dataset"]: r for r in rows if (r["x"], r["y"], r["probe"]) == (x, y, p)}
            if cells:
                lines.append(f"| {variants[x]} - {variants[y]} | {p} | " + " | ".join(contrast_cell(cells[c]) for c in cols)
                             + f" | {100 * cells[POOLED]['mde']:.1f} |")
    mdes = [r["mde"] for r in rows if r["dataset"] == POOLED]
    per_ds = [r["mde"] for r in rows if r["dataset"] != POOLED]
    lines += ["", f"Minimum detectable effect (80% power, two-sided 5%, {MDE_FACTOR:.1f} x the paired bootstrap SE "
              f"over test images): {100 * min(mdes):.1f}-{100 * max(mdes):.1f} points pooled over the three sets, "
              f"{100 * min(per_ds):.1f}-{100 * max(per_ds):.1f} points on one set; a difference must also exceed "
              "its seed s.d. to be more than one training run's luck."]
    return lines + severity_table(summary)


def severity_cell(r: dict) -> str:
    """'-0.05 [-0.12, +0.02] 2/3': severity difference (tree edges), its paired interval, seeds where X is milder."""
    text = f"{r['diff']:+.2f} [{r['ci95'][0]:+.2f}, {r['ci95'][1]:+.2f}] {sum(v < 0 for v in r['per_seed'])}/{len(r['per_seed'])}"
    return f"**{text}**" if r["ci95"][0] > 0 or r["ci95"][1] < 0 else text


def severity_table(summary: dict) -> list[str]:
    """Markdown: paired differences in mistake severity (the paper's 'milder mistakes' claim)."""
    rows = [r for r in summary.get("paired", []) if r.get("metric") == "severity"]
    if not rows:
        return []
    cols = (*EXTERNAL_SETS, POOLED)
    lines = ["", f"Mistake severity X - Y ({rows[0]['probe']} probe; tree edges from the true leaf to the LCA, mean over "
             "errors): negative = X's mistakes are milder; paired bootstrap 95% interval; seeds where X is milder.", "",
             "| X - Y | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    variants = summary["variants"]
    for x, y in CONTRASTS:
        cells = {r["dataset"]: r for r in rows if (r["x"], r["y"]) == (x, y)}
        if cells:
            lines.append(f"| {variants[x]} - {variants[y]} | " + " | ".join(severity_cell(cells[c]) for c in cols) + " |")
    return lines


def base_lines(summary: dict, probes: Sequence[str]) -> list[str]:
    """Markdown: the shared SSL base model against a random backbone of its architecture (test bAcc %)."""
    base = summary.get("base")
    if not base:
        return []
    lines = ["", f"## The shared SSL base model ({base['steps']} steps from scratch)", "",
             "| model | dataset | " + " | ".join(f"bAcc {p}" for p in probes) + " |", "|---|---|" + "---|" * len(probes)]
    for who in ("base", "random"):
        for ds in (*EXTERNAL_SETS, "mean"):
            vals = [base[who][p][ds] for p in probes]
            lines.append(f"| {who} | {ds} | " + " | ".join(f"{100 * v:.1f}" for v in vals) + " |")
    gaps = ", ".join(f"{p} {100 * (base['base'][p]['mean'] - base['random'][p]['mean']):+.1f}" for p in probes)
    return lines + ["", f"Trained minus random, mean over the three sets: {gaps} points."]


def base_summary(rows: list[dict], base: str, random: str, probes: Sequence[str], steps: int) -> dict:
    """bAcc of the base model and the random backbone per probe and dataset, with their mean over datasets."""
    out: dict = {"steps": steps}
    for who, name in (("base", base), ("random", random)):
        out[who] = {}
        for p in probes:
            vals = {r["dataset"]: r["metrics"]["bacc"]["value"] for r in rows if r["model"] == name and r["probe"] == p}
            out[who][p] = vals | {"mean": float(np.mean([vals[d] for d in EXTERNAL_SETS]))}
    return out


def markdown(summary: dict, probes: Sequence[str]) -> str:
    """The v2 report: setup, base model, per-variant table, paired contrasts, supervision and wall time."""
    s = summary["setup"]
    head = table_head(s, probes, "# Reproduction v2: SSL only vs flat CE vs hierarchical CE, continued from a "
                                 "shared SSL model (test splits)")
    extra = (f"Each variant continues from the shared base model for {s['steps']} steps; test images per "
             f"external set: {s.get('test_images', '?')}; {s.get('bootstrap', '?')} paired bootstrap resamples.")
    lines = head[:3] + [extra] + base_lines(summary, probes) + ["", "## Variants", ""] + head[4:]
    lines += variant_rows(summary, probes) + contrast_table(summary, probes) + table_foot(summary)
    return "\n".join(lines) + "\n"
