"""Reproduce the paper's comparison on the synthetic benchmark: SSL only vs flat CE vs hierarchical CE.

  python jobs/reproduce.py                       # 4 variants x 3 seeds, then evaluation on the test splits
  python jobs/reproduce.py --seeds 0 --steps 40 --sweep-trials 2 --out runs/repro-smoke   # a quick check

The design is pre-registered in hierdino/configs/repro/ (read base.yaml). Resumable: finished runs
(an export present) and a finished sweep are skipped when the command is run again.
Writes OUT/results.md, OUT/results.json and OUT/plots/*.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"ssl": "(a) SSL only", "flat": "(b) flat CE", "hxe-alpha0.5": "(c) HXE alpha=0.5",
            "hxe-sweep": "(d) HXE swept level weights"}
EXTERNAL = ("synth-ext-1", "synth-ext-2", "synth-ood")


def labelled_counts(suite: str) -> dict:
    """How many training images each variant can use as supervision (per epoch of the data mix)."""
    from hierdino.data import shards

    fine = shards.read_manifest(f"{suite}/synth-fine").num_labeled("train")
    coarse = shards.read_manifest(f"{suite}/synth-coarse").num_labeled("train")
    return {"ssl": 0, "flat": fine, "hxe-alpha0.5": fine + coarse, "hxe-sweep": fine + coarse,
            "_fine": fine, "_coarse": coarse}


def run_variants(args, suite: str, log=print) -> dict[str, list[str]]:
    from hierdino.config import load_config
    from hierdino.data import storage
    from hierdino.train.launch import run_uri, train
    from hierdino.tune.sweep import run_sweep

    common = [f"data.synth_cache={suite}", f"run.storage={args.out}"]
    if args.steps:
        common += [f"train.steps={args.steps}", f"checkpoint.every_steps={max(1, args.steps // 2)}"]
    sweep_dir = f"{args.out}/sweep-level-weights"
    best = Path(sweep_dir, "best_config.yaml")
    if not best.exists():
        log(f"[reproduce] sweep of the level weights on the val splits ({args.sweep_trials} trials)")
        steps = args.sweep_steps or (args.steps or 300) // 2
        run_sweep("repro/hxe-sweep", str(Path(__file__).resolve().parents[1] / "tune_spaces/level_weights.yaml"),
                  args.sweep_trials, sweep_dir, "asha", 1,
                  common + [f"train.steps={steps}", f"checkpoint.every_steps={steps}", f"eval.every_steps={max(1, steps // 3)}"],
                  log=lambda *_: None)
    level_weights = load_config(str(best)).loss.supervised.level_weights
    log(f"[reproduce] (d) level weights from the sweep: {[round(w, 3) for w in level_weights]}")
    runs: dict[str, list[str]] = {}
    for variant in VARIANTS:
        for seed in args.seeds:
            over = common + [f"train.seed={seed}", f"run.name={variant}-s{seed}"]
            if variant == "hxe-sweep":
                over.append("loss.supervised.level_weights=[" + ",".join(f"{w:.6f}" for w in level_weights) + "]")
            cfg = load_config(f"repro/{variant}", over)
            uri = run_uri(cfg)
            if not storage.exists(storage.join(uri, "export", "model.json")):
                t0 = time.time()
                train(cfg, log=lambda *_: None)
                log(f"[reproduce] trained {variant} seed {seed} in {time.time() - t0:.0f}s")
            runs.setdefault(variant, []).append(uri)
    return runs, level_weights


def summarise(results: dict, runs: dict, counts: dict, level_weights, hours: float) -> dict:
    """Per variant x dataset x probe: mean over seeds, seed s.d., mean bootstrap interval."""
    name_of = {uri.rstrip("/").rsplit("/", 1)[-1]: v for v, uris in runs.items() for uri in uris}
    table: dict = {}
    for row in results["rows"]:
        variant = name_of.get(row["model"])
        if variant is None:
            continue
        cell = table.setdefault(variant, {}).setdefault(row["dataset"], {}).setdefault(row["probe"], {"per_seed": []})
        m = row["metrics"]
        cell["per_seed"].append({k: m[k]["value"] for k in m} | {"bacc_ci95": m["bacc"]["ci95"]})
    for variant, per_ds in table.items():
        for ds, per_probe in per_ds.items():
            for probe, cell in per_probe.items():
                seeds = cell["per_seed"]
                for k in ("bacc", "severity", "lineage_bacc", "hF1"):
                    vals = [s[k] for s in seeds]
                    cell[k] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
                cell["bacc_ci95_mean"] = [float(np.mean([s["bacc_ci95"][i] for s in seeds])) for i in (0, 1)]
    return {"variants": VARIANTS, "table": table, "labelled_per_epoch": counts, "level_weights_d": level_weights,
            "hours": hours}


def markdown(summary: dict, probes: list[str]) -> str:
    lines = ["# SSL only vs flat CE vs hierarchical CE on the synthetic benchmark (test splits)", "",
             "Balanced accuracy (%) as mean over seeds ± seed s.d., with the mean bootstrap 95% interval of a "
             "single run in brackets; severity = mean edges from the true leaf to the LCA over errors (lower is "
             "milder); lineage = depth-1 balanced accuracy. Probe for severity/lineage: logreg.", "",
             "| variant | dataset | " + " | ".join(f"bAcc {p}" for p in probes) + " | severity | lineage bAcc |",
             "|---|---|" + "---|" * (len(probes) + 2)]
    for variant, label in VARIANTS.items():
        for ds in EXTERNAL:
            cells = summary["table"].get(variant, {}).get(ds)
            if not cells:
                continue
            b = [f"{100 * cells[p]['bacc']['mean']:.1f} ± {100 * cells[p]['bacc']['sd']:.1f} "
                 f"[{100 * cells[p]['bacc_ci95_mean'][0]:.1f}, {100 * cells[p]['bacc_ci95_mean'][1]:.1f}]" for p in probes]
            lr = cells[probes[-1]]
            lines.append(f"| {label} | {ds} | " + " | ".join(b) + f" | {lr['severity']['mean']:.2f} ± {lr['severity']['sd']:.2f}"
                         f" | {100 * lr['lineage_bacc']['mean']:.1f} ± {100 * lr['lineage_bacc']['sd']:.1f} |")
    c = summary["labelled_per_epoch"]
    lines += ["", f"Supervision per epoch: flat CE uses the {c['_fine']} leaf-labelled images of synth-fine; HXE also "
              f"uses the {c['_coarse']} coarse-labelled images of synth-coarse (flat CE must ignore them); SSL uses none.",
              f"Variant (d) level weights (from the val-split sweep): {[round(w, 3) for w in summary['level_weights_d']]}.",
              f"Wall time: {summary['hours']:.2f} h."]
    return "\n".join(lines) + "\n"


def plots(summary: dict, results: dict, runs: dict, out: str, probes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(out, "plots").mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(EXTERNAL), figsize=(5 * len(EXTERNAL), 3.5), squeeze=False)
    for ax, ds in zip(axes[0], EXTERNAL):
        for i, p in enumerate(probes):
            xs, ys, lo, hi = [], [], [], []
            for j, v in enumerate(VARIANTS):
                c = summary["table"].get(v, {}).get(ds, {}).get(p)
                if c:
                    xs.append(j + (i - 1) * 0.2)
                    ys.append(100 * c["bacc"]["mean"])
                    lo.append(100 * (c["bacc"]["mean"] - c["bacc_ci95_mean"][0]))
                    hi.append(100 * (c["bacc_ci95_mean"][1] - c["bacc"]["mean"]))
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=p)
        ax.set_xticks(range(len(VARIANTS)), [v for v in VARIANTS], rotation=20, fontsize=8)
        ax.set_title(ds, fontsize=9)
        ax.set_ylabel("balanced accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.savefig(Path(out, "plots", "bacc.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig, axes = plt.subplots(1, len(EXTERNAL), figsize=(5 * len(EXTERNAL), 3.2), squeeze=False)
    for ax, ds in zip(axes[0], EXTERNAL):
        data = [[s["severity"] for s in summary["table"].get(v, {}).get(ds, {}).get(probes[-1], {}).get("per_seed", [])]
                for v in VARIANTS]
        ax.boxplot(data, tick_labels=list(VARIANTS))
        ax.set_title(f"{ds}: mistake severity per seed", fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    fig.savefig(Path(out, "plots", "severity.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/repro")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="override the pre-registered 300 steps (smoke checks only)")
    p.add_argument("--sweep-trials", type=int, default=4)
    p.add_argument("--sweep-steps", type=int, default=None)
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args(argv)
    args.out = str(Path(args.out).absolute())
    from hierdino.config import load_config
    from hierdino.eval.report import evaluate
    from hierdino.train.launch import ensure_synthetic_suite, init_ray

    t0 = time.time()
    cfg = load_config("repro/base")
    ensure_synthetic_suite(cfg)
    suite = cfg.data.synth_cache
    init_ray()
    runs, level_weights = run_variants(args, suite)
    models = [u for uris in runs.values() for u in uris]
    probes = ["knn1", "knn20", "logreg"]
    results = evaluate(models, [f"{suite}/{d}" for d in EXTERNAL], f"{args.out}/report", "test", tuple(probes),
                       args.bootstrap, plots=False, log=lambda *_: None)
    summary = summarise(results, runs, labelled_counts(suite), level_weights, (time.time() - t0) / 3600)
    Path(args.out, "results.json").write_text(json.dumps(summary, indent=2))
    md = markdown(summary, probes)
    Path(args.out, "results.md").write_text(md)
    plots(summary, results, runs, args.out, probes)
    print(md)
    print(f"[reproduce] wrote {args.out}/results.md, results.json and plots/ in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
