"""The v3 comparison's report (issue #36): results.md and plots of ``jobs/reproduce.py --design v3``
(``hierdino.experiments.stages.write_results`` writes them with results.json).

The summary it renders comes from ``hierdino.experiments.v3.summarise_v3``: the data parts, the
shared base model against a random backbone, bAcc per variant (mean +- seed s.d.), the paired
contrasts (``hierdino.experiments.paired``) on PBC, its fine-level classes, each PBC class and the synthetic
sets, mistake severity and the tree-distance correlation of the feature space.
"""

from __future__ import annotations

import numpy as np

from hierdino import storage
from hierdino.experiments.paired import POOLED, contrast_cell, severity_cell

PBC, PBC_FINE = "pbc-eval", "pbc-fine-classes"


def _get(table: dict, d: str, p: str, fmt) -> str:
    """``fmt(table[d][p])``, or '-' where probe ``p`` did not score dataset ``d`` (the synthetic sets: kNN only)."""
    return fmt(table[d][p]) if p in table.get(d, {}) else "-"


def _mean_sd(values) -> str:
    v = 100 * np.asarray(values, dtype=float)
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def _parts_lines(s: dict) -> list[str]:
    p = s["parts"]
    lines = ["", "## Data parts of the PBC train split", "",
             f"Seed {p['seed']}, stratified per leaf: fine {p['fractions']['fine']:.0%}, coarse "
             f"{p['fractions']['coarse']:.0%} (labels moved up to depth {p['coarse_depth']}; naturally coarse images "
             f"keep theirs), unlabelled {p['fractions']['unlabelled']:.0%}.", "", "| part | images | labels |", "|---|---|---|"]
    for name in ("pbc-fine", "pbc-coarse", "pbc-unlabelled"):
        c = p["counts"][name]["train"]
        lines.append(f"| {name} | {sum(c.values())} | " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())) + " |")
    return lines


def _base_lines(s: dict, probes) -> list[str]:
    b = s["base"]
    sets = list(b["base"])
    lines = ["", f"## The shared SSL base model ({s['setup']['base_steps']} steps from scratch) against a random backbone",
             "", "| model | dataset | " + " | ".join(f"bAcc {p}" for p in probes) + " |", "|---|---|" + "---|" * len(probes)]
    for who in ("base", "random"):
        for d in sets:
            lines.append(f"| {who} | {d} | " + " | ".join(_get(b[who], d, p, lambda v: f"{100 * v:.1f}") for p in probes) + " |")
    gaps = "; ".join(f"{d}: " + ", ".join(f"{p} {100 * (b['base'][d][p] - b['random'][d][p]):+.1f}" for p in b["base"][d])
                     for d in sets)
    return lines + ["", f"Trained minus random (points): {gaps}."]


def _variant_lines(s: dict, probes) -> list[str]:
    sets = list(next(iter(s["bacc"].values())))
    lines = ["", "## Variants (test splits)", "",
             "bAcc (%) mean ± seed s.d.; severity: mean tree edges from the true leaf to the LCA over errors "
             f"({probes[-1]} on PBC, the last probe run elsewhere; lower is milder); rho: Spearman correlation of feature distance with tree distance "
             "(higher: the feature space follows the tree).", "",
             "| variant | dataset | " + " | ".join(f"bAcc {p}" for p in probes) + " | severity | rho |",
             "|---|---|" + "---|" * (len(probes) + 2)]
    for v, label in s["variants"].items():
        for d in sets:
            sev = s["severity"][v].get(d)
            rho = s["tree_rho"][v].get(d)
            lines.append(f"| {label} | {d} | " + " | ".join(_get(s["bacc"][v], d, p, _mean_sd) for p in probes)
                         + f" | {np.mean(sev):.2f} | " + (f"{np.mean(rho):.3f} |" if rho else "- |"))
    return lines


def _contrast_lines(s: dict, probes) -> list[str]:
    rows = [r for r in s["paired"] if r["metric"] == "bacc"]
    cols = list(dict.fromkeys(r["dataset"] for r in rows))
    lines = ["", "## Paired differences X - Y", "",
             "Balanced accuracy, points: mean over seeds of the seed-paired difference, the paired bootstrap 95% "
             "interval over test images (the same images for both models and every seed), the s.d. of the per-seed "
             "differences and the seeds where X is ahead. **Bold**: the interval excludes 0. MDE: 2.8 x the bootstrap "
             "SE (80% power, two-sided 5%).", "",
             "| X - Y | probe | " + " | ".join(cols) + f" | MDE {PBC} | MDE {PBC_FINE} |", "|---|---|" + "---|" * (len(cols) + 2)]
    for x, y in dict.fromkeys((r["x"], r["y"]) for r in rows):
        for p in probes:
            cells = {r["dataset"]: r for r in rows if (r["x"], r["y"], r["probe"]) == (x, y, p)}
            lines.append(f"| {s['variants'][x]} - {s['variants'][y]} | {p} | "
                         + " | ".join(contrast_cell(cells[c]) if c in cells else "-" for c in cols)
                         + f" | {100 * cells[PBC]['mde']:.1f} | {100 * cells[PBC_FINE]['mde']:.1f} |")
    sev = [r for r in s["paired"] if r["metric"] == "severity"]
    if sev:
        lines += ["", f"Mistake severity X - Y ({', '.join(sorted({r['probe'] for r in sev}))}: the last probe run on each set; tree edges; negative: X's mistakes are milder; seeds "
                  "where X is milder).", "", "| X - Y | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for x, y in dict.fromkeys((r["x"], r["y"]) for r in sev):
            cells = {r["dataset"]: r for r in sev if (r["x"], r["y"]) == (x, y)}
            lines.append(f"| {s['variants'][x]} - {s['variants'][y]} | "
                         + " | ".join(severity_cell(cells[c]) if c in cells else "-" for c in cols) + " |")
    return lines


def _per_class_lines(s: dict) -> list[str]:
    rows = s.get("paired_per_class", [])
    if not rows:
        return []
    classes = list(dict.fromkeys(r["dataset"] for r in rows))
    lines = ["", f"## Per-class recall differences on PBC ({rows[0]['probe']})", "",
             "Recall X - Y per class, points, paired bootstrap 95% interval, seed s.d., seeds won.", "",
             "| class | " + " | ".join(f"{s['variants'][x].split(' ')[0]} - {s['variants'][y].split(' ')[0]}"
                                      for x, y in dict.fromkeys((r["x"], r["y"]) for r in rows)) + " |",
             "|---|" + "---|" * len(dict.fromkeys((r["x"], r["y"]) for r in rows))]
    for c in classes:
        cells = [r for r in rows if r["dataset"] == c]
        lines.append(f"| {c[4:]} | " + " | ".join(contrast_cell(r) for r in cells) + " |")
    return lines


def markdown(s: dict) -> str:
    """The v3 report."""
    st, probes = s["setup"], s["probes"]
    lines = ["# Reproduction v3: does the tree help when labels come at mixed depths? (PBC, test split)", "",
             f"Setup: {st['arch']} at {st['image_size']} px (centre {st['center_crop']} of each side), base model "
             f"{st['base_steps']} steps, each variant {st['steps']} more steps of batch {st['batch_size']}, seeds "
             f"{st['seeds']}, on {st['device']}; {st['bootstrap']} paired bootstrap resamples. Test images: "
             + ", ".join(f"{d} {n}" for d, n in s["test_images"].items()) + ". (d)'s level weights "
             f"({st['level_weights_source']}): {[round(w, 3) for w in s['level_weights']] if s['level_weights'] else '-'}."
             f" Wall time {60 * s['hours']:.0f} min."]
    lines += _parts_lines(s) + _base_lines(s, probes) + _variant_lines(s, probes) + _contrast_lines(s, probes)
    return "\n".join(lines + _per_class_lines(s)) + "\n"


def plot(s: dict, out: str) -> list[str]:
    """plots/contrasts.png: every contrast's paired difference and interval on PBC, its fine classes and
    the pooled synthetic sets, one panel per probe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hierdino.eval.plots import save_png

    probes = s["probes"]
    rows = [r for r in s["paired"] if r["metric"] == "bacc"]
    pairs = list(dict.fromkeys((r["x"], r["y"]) for r in rows))
    groups = [g for g in (PBC, PBC_FINE, "synthetic pooled", POOLED) if any(r["dataset"] == g for r in rows)]
    fig, axes = plt.subplots(1, len(probes), figsize=(4.2 * len(probes), 0.5 + 0.45 * len(pairs) * len(groups)), sharey=True)
    for ax, p in zip(np.atleast_1d(axes), probes):
        ticks = []
        for i, (x, y) in enumerate(pairs):
            for j, g in enumerate(groups):
                r = next((r for r in rows if (r["x"], r["y"], r["probe"], r["dataset"]) == (x, y, p, g)), None)
                if r is None:  # a probe that did not score this group
                    continue
                pos = -(i * (len(groups) + 1) + j)
                ax.errorbar(100 * r["diff"], pos, xerr=[[100 * (r["diff"] - r["ci95"][0])], [100 * (r["ci95"][1] - r["diff"])]],
                            fmt="o", color=f"C{j}", label=g if i == 0 else None)
                ticks.append((pos, f"{s['variants'][x].split(' ')[0]}-{s['variants'][y].split(' ')[0]}" if j == 0 else ""))
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(p)
        ax.set_xlabel("bAcc difference X - Y (points)")
        ax.set_yticks([t for t, _ in ticks], [n for _, n in ticks])
    fullest = max(np.atleast_1d(axes), key=lambda a: len(a.get_legend_handles_labels()[1]))
    fullest.legend(fontsize=7, loc="lower left")  # the panel that holds every group
    path = save_png(fig, storage.join(out, "plots", "contrasts.png"))
    plt.close(fig)
    return [path]

