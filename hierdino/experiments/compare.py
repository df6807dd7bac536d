"""Comparison statistics, tables and plots of several trained variants.

Owns the variants of the pre-registered comparison (SSL only, flat CE, hierarchical CE with a fixed
alpha and with swept level weights), the supervision each one sees, the summary of an evaluation
report over seeds (mean, seed s.d., mean bootstrap interval), the seed-paired differences between
variants, the Markdown results table and the PNG plots of balanced accuracy and mistake severity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hierdino import storage
from hierdino.data import shards
from hierdino.data.suite import EXTERNAL_SETS
from hierdino.eval.plots import pyplot, save_png

VARIANTS = {"ssl": "(a) SSL only", "flat": "(b) flat CE", "hxe-alpha0.5": "(c) HXE alpha=0.5",
            "hxe-sweep": "(d) HXE swept level weights"}
CONTRASTS = (("hxe-alpha0.5", "flat"), ("hxe-sweep", "flat"), ("hxe-alpha0.5", "ssl"), ("flat", "ssl"))
SEED_METRICS = ("bacc", "severity", "lineage_bacc", "hF1")


def labelled_counts(suite: str) -> dict:
    """How many training images each variant can use as supervision (per epoch of the data mix)."""
    fine = shards.read_manifest(f"{suite}/synth-fine").num_labeled("train")
    coarse = shards.read_manifest(f"{suite}/synth-coarse").num_labeled("train")
    return {"ssl": 0, "flat": fine, "hxe-alpha0.5": fine + coarse, "hxe-sweep": fine + coarse,
            "_fine": fine, "_coarse": coarse}


def _sample_sd(values) -> float:
    """Sample standard deviation (ddof=1); 0 for a single value."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _cell(summary: dict, variant: str, dataset: str, probe: str | None = None):
    """One entry of the summary table: per probe for a dataset, or one probe's cell (None if absent)."""
    per_probe = summary["table"].get(variant, {}).get(dataset)
    if probe is None or per_probe is None:
        return per_probe
    return per_probe.get(probe)


def _per_seed_table(rows: list[dict], runs: dict[str, list[str]]) -> dict:
    """variant -> dataset -> probe -> {"per_seed": [metric values of each run]}; other models left out."""
    name_of = {uri.rstrip("/").rsplit("/", 1)[-1]: v for v, uris in runs.items() for uri in uris}
    table: dict = {}
    for row in rows:
        variant = name_of.get(row["model"])
        if variant is None:
            continue
        cell = table.setdefault(variant, {}).setdefault(row["dataset"], {}).setdefault(row["probe"], {"per_seed": []})
        m = row["metrics"]
        cell["per_seed"].append({k: m[k]["value"] for k in m} | {"bacc_ci95": m["bacc"]["ci95"]})
    return table


def _add_seed_statistics(cell: dict) -> None:
    """Mean and seed s.d. of each metric, and the mean bootstrap interval of bAcc, into ``cell``."""
    seeds = cell["per_seed"]
    for k in SEED_METRICS:
        vals = [s[k] for s in seeds]
        cell[k] = {"mean": float(np.mean(vals)), "sd": _sample_sd(vals)}
    cell["bacc_ci95_mean"] = [float(np.mean([s["bacc_ci95"][i] for s in seeds])) for i in (0, 1)]


def summarise(results: dict, runs: dict, counts: dict, level_weights, hours: float, setup: dict,
              variants: dict | None = None) -> dict:
    """Per variant x dataset x probe: mean over seeds, seed s.d., mean bootstrap interval.

    ``results`` is an evaluation report (its ``rows``); ``runs`` maps each variant to its run URIs;
    ``variants`` (default: the v1 design's) maps variant names to their labels in tables and plots.
    """
    table = _per_seed_table(results["rows"], runs)
    for per_ds in table.values():
        for per_probe in per_ds.values():
            for cell in per_probe.values():
                _add_seed_statistics(cell)
    return {"variants": dict(variants or VARIANTS), "setup": setup, "table": table, "labelled_per_epoch": counts,
            "level_weights_d": level_weights, "hours": hours}


def _paired_difference(cx: dict, cy: dict) -> dict:
    """Seed-paired bAcc differences of two cells, next to a single run's mean interval half-width."""
    d = [a["bacc"] - b["bacc"] for a, b in zip(cx["per_seed"], cy["per_seed"])]
    half = np.mean([(s["bacc_ci95"][1] - s["bacc_ci95"][0]) / 2 for s in cx["per_seed"] + cy["per_seed"]])
    return {"diff": float(np.mean(d)), "sd": _sample_sd(d), "wins": int(sum(v > 0 for v in d)),
            "seeds": len(d), "ci_half_width": float(half)}


def contrasts(summary: dict, probes: Sequence[str]) -> list[dict]:
    """Seed-paired bAcc differences X - Y per dataset and probe, next to a single run's interval half-width."""
    out = []
    for x, y in CONTRASTS:
        for ds in EXTERNAL_SETS:
            for p in probes:
                cx, cy = _cell(summary, x, ds, p), _cell(summary, y, ds, p)
                if not cx or not cy or len(cx["per_seed"]) != len(cy["per_seed"]):
                    continue
                out.append({"x": x, "y": y, "dataset": ds, "probe": p} | _paired_difference(cx, cy))
    return out


def _contrast_text(c: dict | None) -> str:
    """One contrast as 'diff ± sd (wins/seeds; ±half-width)' in percentage points ('' if missing)."""
    if not c:
        return ""
    return f"{100 * c['diff']:+.1f} ± {100 * c['sd']:.1f} ({c['wins']}/{c['seeds']}; ±{100 * c['ci_half_width']:.1f})"


def contrast_lines(summary: dict, probes: Sequence[str]) -> list[str]:
    """The Markdown table of the seed-paired differences (no lines when no contrast has both sides)."""
    rows = contrasts(summary, probes)
    if not rows:
        return []
    lines = ["", "Seed-paired differences in bAcc (percentage points, mean ± s.d. over seeds; seeds where X wins), "
             "next to the mean half-width of one run's bootstrap 95% interval:", "",
             "| X - Y | dataset | " + " | ".join(probes) + " |", "|---|---|" + "---|" * len(probes)]
    for x, y in CONTRASTS:
        for ds in EXTERNAL_SETS:
            cells = {r["probe"]: r for r in rows if (r["x"], r["y"], r["dataset"]) == (x, y, ds)}
            if cells:
                lines.append(f"| {VARIANTS[x]} - {VARIANTS[y]} | {ds} | "
                             + " | ".join(_contrast_text(cells.get(p)) for p in probes) + " |")
    return lines


def table_head(setup: dict, probes: Sequence[str], title: str = "# SSL only vs flat CE vs hierarchical CE on the "
                "synthetic benchmark (test splits)") -> list[str]:
    """Title, setup line, legend and header of the results table."""
    return [title, "",
            f"Setup: {setup['arch']} at {setup['image_size']} px, {setup['steps']} steps of batch {setup['batch_size']}, "
            f"seeds {setup['seeds']}, scale {setup['scale'] or 'none (pre-registered CPU design)'}, on {setup['device']}.", "",
            "Balanced accuracy (%) as mean over seeds ± seed s.d., with the mean bootstrap 95% interval of a "
            "single run in brackets; severity = mean edges from the true leaf to the LCA over errors (lower is "
            "milder); lineage = depth-1 balanced accuracy. Probe for severity/lineage: logreg.", "",
            "| variant | dataset | " + " | ".join(f"bAcc {p}" for p in probes) + " | severity | lineage bAcc |",
            "|---|---|" + "---|" * (len(probes) + 2)]


def _result_row(label: str, ds: str, cells: dict, probes: Sequence[str]) -> str:
    """One table row: bAcc per probe, then severity and lineage bAcc of the last probe."""
    b = [f"{100 * cells[p]['bacc']['mean']:.1f} ± {100 * cells[p]['bacc']['sd']:.1f} "
         f"[{100 * cells[p]['bacc_ci95_mean'][0]:.1f}, {100 * cells[p]['bacc_ci95_mean'][1]:.1f}]" for p in probes]
    lr = cells[probes[-1]]
    return (f"| {label} | {ds} | " + " | ".join(b) + f" | {lr['severity']['mean']:.2f} ± {lr['severity']['sd']:.2f}"
            f" | {100 * lr['lineage_bacc']['mean']:.1f} ± {100 * lr['lineage_bacc']['sd']:.1f} |")


def table_foot(summary: dict) -> list[str]:
    """Supervision per epoch, the level weights of variant (d) and the wall time."""
    c = summary["labelled_per_epoch"]
    return ["", f"Supervision per epoch: flat CE uses the {c['_fine']} leaf-labelled images of synth-fine; HXE also "
            f"uses the {c['_coarse']} coarse-labelled images of synth-coarse (flat CE must ignore them); SSL uses none.",
            f"Variant (d) level weights ({summary['setup']['level_weights_source']}): "
            f"{[round(w, 3) for w in summary['level_weights_d']]}.",
            f"Wall time: {summary['hours']:.2f} h."]


def variant_rows(summary: dict, probes: Sequence[str]) -> list[str]:
    """One results-table row per variant (of ``summary["variants"]``) and external dataset."""
    lines = []
    for variant, label in summary["variants"].items():
        for ds in EXTERNAL_SETS:
            cells = _cell(summary, variant, ds)
            if cells:
                lines.append(_result_row(label, ds, cells, probes))
    return lines


def markdown(summary: dict, probes: Sequence[str]) -> str:
    """The results table of ``summarise``'s output: one row per variant and external dataset, then contrasts."""
    lines = table_head(summary["setup"], probes) + variant_rows(summary, probes)
    lines += contrast_lines(summary, probes)
    lines += table_foot(summary)
    return "\n".join(lines) + "\n"


def _save(plt, fig, out: str, name: str) -> None:
    """Write ``fig`` as OUT/plots/NAME (atomically: ``storage.write_bytes``) and close it."""
    save_png(fig, storage.join(out, "plots", name))
    plt.close(fig)


def _bacc_points(summary: dict, ds: str, probe: str, offset: float) -> tuple[list, list, list, list]:
    """x positions, mean bAcc (%) and the lower/upper error bar lengths of each variant that has the cell."""
    xs, ys, lo, hi = [], [], [], []
    for j, v in enumerate(summary["variants"]):
        c = _cell(summary, v, ds, probe)
        if c:
            xs.append(j + offset)
            ys.append(100 * c["bacc"]["mean"])
            lo.append(100 * (c["bacc"]["mean"] - c["bacc_ci95_mean"][0]))
            hi.append(100 * (c["bacc_ci95_mean"][1] - c["bacc"]["mean"]))
    return xs, ys, lo, hi


def _bacc_plot(plt, summary: dict, out: str, probes: Sequence[str]) -> None:
    """plots/bacc.png: mean bAcc with the mean bootstrap interval, one panel per external dataset."""
    fig, axes = plt.subplots(1, len(EXTERNAL_SETS), figsize=(5 * len(EXTERNAL_SETS), 3.5), squeeze=False)
    for ax, ds in zip(axes[0], EXTERNAL_SETS):
        for i, p in enumerate(probes):
            xs, ys, lo, hi = _bacc_points(summary, ds, p, (i - 1) * 0.2)
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=p)
        ax.set_xticks(range(len(summary["variants"])), list(summary["variants"]), rotation=20, fontsize=8)
        ax.set_title(ds, fontsize=9)
        ax.set_ylabel("balanced accuracy (%)")
    axes[0][0].legend(fontsize=7)
    _save(plt, fig, out, "bacc.png")


def _severity_plot(plt, summary: dict, out: str, probe: str) -> None:
    """plots/severity.png: box plots of the per-seed mistake severity of each variant under ``probe``."""
    fig, axes = plt.subplots(1, len(EXTERNAL_SETS), figsize=(5 * len(EXTERNAL_SETS), 3.2), squeeze=False)
    for ax, ds in zip(axes[0], EXTERNAL_SETS):
        data = [[s["severity"] for s in (_cell(summary, v, ds, probe) or {}).get("per_seed", [])] for v in summary["variants"]]
        ax.boxplot(data, tick_labels=list(summary["variants"]))
        ax.set_title(f"{ds}: mistake severity per seed", fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    _save(plt, fig, out, "severity.png")


def plots(summary: dict, out: str, probes: Sequence[str]) -> None:
    """Write OUT/plots/bacc.png and OUT/plots/severity.png (severity under the last probe)."""
    plt = pyplot()
    _bacc_plot(plt, summary, out, probes)
    _severity_plot(plt, summary, out, probes[-1])
