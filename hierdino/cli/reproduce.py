"""Reproduce the paper's comparison on the synthetic benchmark: SSL only vs flat CE vs hierarchical CE.

  python jobs/reproduce.py                       # 4 variants x 3 seeds, then evaluation on the test splits
  python jobs/reproduce.py --seeds 0 --steps 40 --sweep-trials 2 --out runs/repro-smoke   # a quick check
  python jobs/reproduce.py --scale vits14-gpu --time-budget-min 7 --seeds 0 1 \
      --level-weights 0.25,0.3,0.28,0.16 --out runs/repro-vits14   # 224 px ViT-S/14 on one GPU

The design is pre-registered in hierdino/configs/repro/ (read base.yaml). Resumable: finished runs
(an export present) and a finished sweep are skipped when the command is run again.
``--scale NAME`` lays hierdino/configs/repro/scale-NAME.yaml over every variant (model, image size,
resources; never the losses). ``--time-budget-min`` (with no ``--steps``) times a short calibration
run and gives every variant the same number of steps that fits the budget, fixed before any variant
trains. ``--level-weights`` gives variant (d) weights chosen elsewhere instead of sweeping.
Writes OUT/results.md, OUT/results.json and OUT/plots/*.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


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


def scale_overrides(name: str | None) -> list[str]:
    """``hierdino/configs/repro/scale-NAME.yaml`` as ``key.sub=value`` overrides (empty without a scale)."""
    if not name:
        return []
    from importlib import resources

    from hierdino.config import preset_overrides

    repro = resources.files("hierdino.configs") / "repro"
    if not (repro / f"scale-{name}.yaml").is_file():
        scales = sorted(p.name[6:-5] for p in repro.iterdir() if p.name.startswith("scale-"))
        raise SystemExit(f"reproduce.py: unknown --scale {name!r} (known: {', '.join(scales)})")
    return preset_overrides(f"repro/scale-{name}")


def steps_for_budget(recs: list[dict], batch_size: int, wall_s: float, left_s: float, n_runs: int) -> tuple[int, float, float]:
    """(steps per run rounded down to 10, seconds per step, start-up seconds per run) from a calibration run.

    The step time is the steady state between the last two ``metrics.jsonl`` records (the first steps
    wait for the pipeline to start); the rest of the run's wall time counts as per-run start-up.
    """
    elapsed = [r["step"] * batch_size / r["images_per_s"] for r in recs[-2:]]
    step_s = (elapsed[1] - elapsed[0]) / (recs[-1]["step"] - recs[-2]["step"])
    overhead = max(0.0, wall_s - recs[-1]["step"] * step_s)
    return int((left_s / n_runs - overhead) / step_s) // 10 * 10, step_s, overhead


def calibrate_steps(args, common: list[str], n_runs: int, log=print) -> int:
    """Steps per variant that fit ``--time-budget-min``, from a timed 40-step run of variant (c).

    Budget per run = (budget - time spent so far - evaluation reserve) / runs; a run costs its
    start-up (the calibration run's wall time beyond its steps) plus steps at the measured rate.
    Decided from timings alone, before any variant trains, and the same for every variant.
    """
    from hierdino.config import load_config
    from hierdino import storage
    from hierdino.train.checkpoint import run_uri
    from hierdino.train.launch import train

    cfg = load_config("repro/hxe-alpha0.5", common + ["train.steps=40", "checkpoint.every_steps=40", "train.log_every=10",
                                                      "run.name=calibration"])
    t0 = time.time()
    train(cfg, log=lambda *_: None)
    wall = time.time() - t0
    recs = [json.loads(line) for line in storage.read_bytes(storage.join(run_uri(cfg), "metrics.jsonl")).decode().splitlines()]
    left = args.time_budget_min * 60 - (time.time() - args.t0) - args.eval_reserve_s
    steps, step_s, overhead = steps_for_budget(recs, cfg.train.batch_size, wall, left, n_runs)
    log(f"[reproduce] calibration: {cfg.train.batch_size / step_s:.0f} img/s ({step_s:.3f} s/step), start-up "
        f"{overhead:.0f}s per run, {left:.0f}s left for {n_runs} runs -> {steps} steps each")
    if steps < 50:
        raise SystemExit(f"reproduce.py: --time-budget-min {args.time_budget_min} leaves {steps} steps per run (< 50); "
                         f"raise the budget or use fewer --seeds")
    return steps


def run_variants(args, suite: str, log=print) -> tuple[dict[str, list[str]], list[float]]:
    from hierdino.config import load_config, override_text
    from hierdino import storage
    from hierdino.train.checkpoint import run_uri
    from hierdino.train.launch import train
    from hierdino.tune.sweep import run_sweep

    common = scale_overrides(args.scale) + [f"data.synth_cache={suite}", f"run.storage={args.out}"]
    if not args.steps and args.time_budget_min:
        args.steps = calibrate_steps(args, common, len(args.variants) * len(args.seeds), log)
    if args.steps:
        common += [f"train.steps={args.steps}", f"checkpoint.every_steps={max(1, args.steps // 2)}"]
    args.steps = load_config("repro/base", common).train.steps
    if args.level_weights:
        level_weights = args.level_weights
        log(f"[reproduce] (d) level weights as given: {level_weights}")
    else:
        sweep_dir = f"{args.out}/sweep-level-weights"
        best = Path(sweep_dir, "best_config.yaml")
        if not best.exists():
            log(f"[reproduce] sweep of the level weights on the val splits ({args.sweep_trials} trials)")
            steps = args.sweep_steps or args.steps // 2
            run_sweep("repro/hxe-sweep", str(Path(__file__).resolve().parents[2] / "tune_spaces/level_weights.yaml"),
                      args.sweep_trials, sweep_dir, "asha", 1,
                      common + [f"train.steps={steps}", f"checkpoint.every_steps={steps}", f"eval.every_steps={max(1, steps // 3)}"],
                      log=lambda *_: None)
        level_weights = load_config(str(best)).loss.supervised.level_weights
        log(f"[reproduce] (d) level weights from the sweep: {[round(w, 3) for w in level_weights]}")
    runs: dict[str, list[str]] = {}
    for variant in args.variants:
        for seed in args.seeds:
            over = common + [f"train.seed={seed}", f"run.name={variant}-s{seed}"]
            if variant == "hxe-sweep":
                over.append(f"loss.supervised.level_weights={override_text(level_weights)}")
            cfg = load_config(f"repro/{variant}", over)
            uri = run_uri(cfg)
            if not storage.exists(storage.join(uri, "export", "model.json")):
                t0 = time.time()
                train(cfg, log=lambda *_: None)
                log(f"[reproduce] trained {variant} seed {seed} in {time.time() - t0:.0f}s")
            runs.setdefault(variant, []).append(uri)
    return runs, level_weights


def summarise(results: dict, runs: dict, counts: dict, level_weights, hours: float, setup: dict) -> dict:
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
    return {"variants": VARIANTS, "setup": setup, "table": table, "labelled_per_epoch": counts,
            "level_weights_d": level_weights, "hours": hours}


def markdown(summary: dict, probes: list[str]) -> str:
    st = summary["setup"]
    lines = ["# SSL only vs flat CE vs hierarchical CE on the synthetic benchmark (test splits)", "",
             f"Setup: {st['arch']} at {st['image_size']} px, {st['steps']} steps of batch {st['batch_size']}, "
             f"seeds {st['seeds']}, scale {st['scale'] or 'none (pre-registered CPU design)'}, on {st['device']}.", "",
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
    lines += contrast_lines(summary, probes)
    c = summary["labelled_per_epoch"]
    lines += ["", f"Supervision per epoch: flat CE uses the {c['_fine']} leaf-labelled images of synth-fine; HXE also "
              f"uses the {c['_coarse']} coarse-labelled images of synth-coarse (flat CE must ignore them); SSL uses none.",
              f"Variant (d) level weights ({st['level_weights_source']}): "
              f"{[round(w, 3) for w in summary['level_weights_d']]}.",
              f"Wall time: {summary['hours']:.2f} h."]
    return "\n".join(lines) + "\n"


CONTRASTS = (("hxe-alpha0.5", "flat"), ("hxe-sweep", "flat"), ("hxe-alpha0.5", "ssl"), ("flat", "ssl"))


def contrasts(summary: dict, probes: list[str]) -> list[dict]:
    """Seed-paired bAcc differences X - Y per dataset and probe, next to a single run's interval half-width."""
    out = []
    for x, y in CONTRASTS:
        for ds in EXTERNAL:
            for p in probes:
                cx = summary["table"].get(x, {}).get(ds, {}).get(p)
                cy = summary["table"].get(y, {}).get(ds, {}).get(p)
                if not cx or not cy or len(cx["per_seed"]) != len(cy["per_seed"]):
                    continue
                d = [a["bacc"] - b["bacc"] for a, b in zip(cx["per_seed"], cy["per_seed"])]
                half = np.mean([(s["bacc_ci95"][1] - s["bacc_ci95"][0]) / 2 for s in cx["per_seed"] + cy["per_seed"]])
                out.append({"x": x, "y": y, "dataset": ds, "probe": p, "diff": float(np.mean(d)),
                            "sd": float(np.std(d, ddof=1)) if len(d) > 1 else 0.0, "wins": int(sum(v > 0 for v in d)),
                            "seeds": len(d), "ci_half_width": float(half)})
    return out


def contrast_lines(summary: dict, probes: list[str]) -> list[str]:
    rows = contrasts(summary, probes)
    if not rows:
        return []
    lines = ["", "Seed-paired differences in bAcc (percentage points, mean ± s.d. over seeds; seeds where X wins), "
             "next to the mean half-width of one run's bootstrap 95% interval:", "",
             "| X - Y | dataset | " + " | ".join(probes) + " |", "|---|---|" + "---|" * len(probes)]
    for x, y in CONTRASTS:
        for ds in EXTERNAL:
            cells = {r["probe"]: r for r in rows if (r["x"], r["y"], r["dataset"]) == (x, y, ds)}
            if cells:
                lines.append(f"| {VARIANTS[x]} - {VARIANTS[y]} | {ds} | " + " | ".join(
                    f"{100 * c['diff']:+.1f} ± {100 * c['sd']:.1f} ({c['wins']}/{c['seeds']}; ±{100 * c['ci_half_width']:.1f})"
                    if (c := cells.get(p)) else "" for p in probes) + " |")
    return lines


def plots(summary: dict, out: str, probes: list[str]) -> None:
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


def describe_setup(args, cfg, device: str) -> dict:
    return {"scale": args.scale, "arch": cfg.model.arch, "image_size": cfg.data.image_size, "steps": args.steps or cfg.train.steps,
            "batch_size": cfg.train.batch_size, "seeds": args.seeds, "device": device,
            "level_weights_source": "given with --level-weights" if args.level_weights else "from the val-split sweep"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/repro")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="a subset of the variants (smoke checks; the comparison needs all four)")
    p.add_argument("--steps", type=int, default=None, help="override the pre-registered 300 steps (smoke checks only)")
    p.add_argument("--sweep-trials", type=int, default=4)
    p.add_argument("--sweep-steps", type=int, default=None)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--scale", default=None, help="lay hierdino/configs/repro/scale-NAME.yaml over every variant")
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="without --steps: pick the steps per variant that fit this many minutes (timed calibration run)")
    p.add_argument("--eval-reserve-s", type=float, default=120, help="seconds of the budget kept for the evaluation")
    p.add_argument("--render", action="store_true", help="only rewrite OUT/results.md from OUT/results.json")
    p.add_argument("--level-weights", type=lambda t: [float(w) for w in t.split(",")], default=None,
                   help="variant (d) weights w1,...,wD chosen elsewhere (e.g. the CPU run's val sweep) instead of sweeping")
    args = p.parse_args(argv)
    args.out = str(Path(args.out).absolute())
    args.t0 = time.time()
    probes = ["knn1", "knn20", "logreg"]
    from hierdino.config import load_config

    if args.render:
        summary = json.loads(Path(args.out, "results.json").read_text())
        if "setup" not in summary:  # written before the setup was recorded: the design's defaults
            summary["setup"] = describe_setup(args, load_config("repro/base", scale_overrides(args.scale)), "not recorded")
        md = markdown(summary, probes)
        Path(args.out, "results.md").write_text(md)
        print(md)
        return 0
    from hierdino.eval.report import evaluate
    from hierdino.data.suite import ensure_synthetic_suite
    from hierdino.runtime import init_ray

    cfg = load_config("repro/base", scale_overrides(args.scale))
    ensure_synthetic_suite(cfg)
    suite = cfg.data.synth_cache
    init_ray()
    runs, level_weights = run_variants(args, suite)
    models = [u for uris in runs.values() for u in uris]
    results = evaluate(models, [f"{suite}/{d}" for d in EXTERNAL], f"{args.out}/report", "test", tuple(probes),
                       args.bootstrap, plots=False, log=lambda *_: None)
    import torch

    setup = describe_setup(args, cfg, torch.cuda.get_device_name(0) if cfg.scaling.use_gpu and torch.cuda.is_available()
                           else f"{os.cpu_count()} CPUs")
    summary = summarise(results, runs, labelled_counts(suite), level_weights, (time.time() - args.t0) / 3600, setup)
    Path(args.out, "results.json").write_text(json.dumps(summary, indent=2))
    md = markdown(summary, probes)
    Path(args.out, "results.md").write_text(md)
    plots(summary, args.out, probes)
    print(md)
    print(f"[reproduce] wrote {args.out}/results.md, results.json and plots/ in {(time.time() - args.t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
