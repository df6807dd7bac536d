"""Reproduce the paper's comparison on the synthetic benchmark: SSL only vs flat CE vs hierarchical CE.

  python jobs/reproduce.py                       # 4 variants x 3 seeds, then evaluation on the test splits
  python jobs/reproduce.py --design v2 --time-budget-min 120   # v2: shared SSL base, 5 variants x 3 seeds, paired
  python jobs/reproduce.py --design v3 --pbc .../PBC_dataset_normal_DIB   # v3: real cells, labels at mixed depths
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
from importlib import resources
from pathlib import Path

from hierdino import storage
from hierdino.cli import user_errors
from hierdino.data.ingest import IngestError
from hierdino.data.shards import ShardError
from hierdino.eval import EvalDataError
from hierdino.runtime import upload_dir_problem
from hierdino.storage import StorageError, StorageOptions
from hierdino.config import load_config, override_text, preset_overrides
from hierdino.data.suite import EXTERNAL_SETS, ensure_synthetic_suite
from hierdino.eval.compare import VARIANTS, labelled_counts, markdown, plots, summarise
from hierdino.eval.paired import VARIANTS as V2_VARIANTS
from hierdino.eval.paired import markdown as v2_markdown
from hierdino.cli.reproduce_v3 import VARIANTS as V3_VARIANTS
from hierdino.runtime import init_ray


def scale_overrides(name: str | None) -> list[str]:
    """``hierdino/configs/repro/scale-NAME.yaml`` as ``key.sub=value`` overrides (empty without a scale)."""
    if not name:
        return []
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


def calibrate_steps(args, common: list[str], n_runs: float, log=print, preset: str = "repro/hxe-alpha0.5") -> int:
    """Steps per variant that fit ``--time-budget-min``, from a timed 40-step run of ``preset`` (variant (c)).

    Budget per run = (budget - time spent so far - evaluation reserve) / runs; a run costs its
    start-up (the calibration run's wall time beyond its steps) plus steps at the measured rate.
    Decided from timings alone, before any variant trains, and the same for every variant.
    """
    # torch and Ray: imported only when training, so --help and --render stay fast
    from hierdino.train.checkpoint import run_uri
    from hierdino.train.launch import train

    cfg = load_config(preset, common + ["train.steps=40", "checkpoint.every_steps=40", "train.log_every=10",
                                                      "run.name=calibration"])
    t0 = time.time()
    train(cfg, log=lambda *_: None)
    wall = time.time() - t0
    recs = [json.loads(line) for line in storage.read_bytes(storage.join(run_uri(cfg), "metrics.jsonl")).decode().splitlines()]
    left = args.time_budget_min * 60 - (time.time() - args.t0) - args.eval_reserve_s
    steps, step_s, overhead = steps_for_budget(recs, cfg.train.batch_size, wall, left, n_runs)
    log(f"[reproduce] calibration: {cfg.train.batch_size / step_s:.0f} img/s ({step_s:.3f} s/step), start-up "
        f"{overhead:.0f}s per run, {left:.0f}s left for {n_runs:g} runs -> {steps} steps each")
    if steps < 50:
        raise SystemExit(f"reproduce.py: --time-budget-min {args.time_budget_min} leaves {steps} steps per run (< 50); "
                         f"raise the budget or use fewer --seeds")
    return steps


def _common_overrides(args, suite: str, log=print) -> list[str]:
    """Overrides shared by every run (scale, suite, storage, steps); fixes ``args.steps``."""
    common = scale_overrides(args.scale) + [f"data.synth_cache={suite}", f"run.storage={args.out}"]
    plan = Path(args.out, "plan.json")  # the calibrated steps, kept: a rerun must train the same steps
    if not args.steps and args.time_budget_min and plan.exists():
        args.steps = json.loads(plan.read_text())["steps"]
        log(f"[reproduce] steps per variant fixed by the first start of this run: {args.steps} ({plan})")
    elif not args.steps and args.time_budget_min:
        args.steps = calibrate_steps(args, common, len(args.variants) * len(args.seeds), log)
        storage.write_bytes(str(plan), json.dumps({"steps": args.steps}).encode())
    if args.steps:
        common += [f"train.steps={args.steps}", f"checkpoint.every_steps={max(1, args.steps // 2)}"]
    args.steps = load_config("repro/base", common).train.steps
    return common


def _level_weights_d(args, common: list[str], log=print, preset: str = "repro/hxe-sweep") -> list[float]:
    """Variant (d)'s level weights: ``--level-weights``, else the best of a sweep on the val splits (resumable)."""
    if args.level_weights:
        log(f"[reproduce] (d) level weights as given: {args.level_weights}")
        return args.level_weights
    sweep_dir = f"{args.out}/sweep-level-weights"
    best = Path(sweep_dir, "best_config.yaml")
    if not best.exists():
        # Ray Tune and torch: imported only when sweeping
        from hierdino.tune.sweep import run_sweep

        log(f"[reproduce] sweep of the level weights on the val splits ({args.sweep_trials} trials)")
        steps = args.sweep_steps or args.steps // 2
        res = run_sweep(preset, str(Path(__file__).resolve().parents[2] / "tune_spaces/level_weights.yaml"),
                        args.sweep_trials, sweep_dir, "asha", 1,
                        common + [f"train.steps={steps}", f"checkpoint.every_steps={steps}",
                                  f"eval.every_steps={max(1, steps // 3)}"], log=lambda *_: None)
        if res.get("interrupted"):  # no best_config.yaml: the next run resumes the sweep
            raise Stopped(f"the level-weight sweep ({res['how']})")
    level_weights = load_config(str(best)).loss.supervised.level_weights
    log(f"[reproduce] (d) level weights from the sweep: {[round(w, 3) for w in level_weights]}")
    return level_weights


class Stopped(Exception):
    """A stage stopped by SIGINT / SIGTERM (its run checkpointed, or its sweep saved): the comparison stops too."""


def train_once(preset: str, overrides: list[str], log=print) -> str:
    """Train ``preset`` with ``overrides`` unless its run already has an export of this config (the
    same recipe and steps); returns the run URI. A run of another config is
    refused (``ResumeError`` naming the keys, or the steps); a run stopped by a signal raises ``Stopped``."""
    # torch and Ray: imported only when training, so --help and --render stay fast
    from hierdino.train.checkpoint import run_uri
    from hierdino.train.launch import train
    from hierdino.train.resume import ResumeError, check_compatible, saved_config

    cfg = load_config(preset, overrides)
    uri = run_uri(cfg)
    saved = saved_config(uri, StorageOptions.from_config(cfg))
    if saved is not None:  # a rerun: only the same run goes on (a smoke test's 40 steps must not enter the table)
        if saved.train.steps != cfg.train.steps:
            raise ResumeError(f"{uri} was started with train.steps={saved.train.steps}, this comparison asks "
                              f"{cfg.train.steps}: give another --out, or the earlier --steps / --time-budget-min")
        check_compatible(saved, cfg, uri)
        if storage.exists(storage.join(uri, "export", "model.json")):
            return uri
    t0 = time.time()
    final = train(cfg, log=lambda *_: None)
    if final.get("stopped_by"):
        raise Stopped(f"{cfg.run.name} by {final['stopped_by']} after step {final.get('step')} (checkpoint "
                      f"{final.get('checkpoint')})")
    log(f"[reproduce] trained {cfg.run.name} in {time.time() - t0:.0f}s")
    return uri


def train_variants(args, common: list[str], level_weights, prefix: str = "repro", log=print) -> dict[str, list[str]]:
    """Train every variant x seed of ``args`` (presets ``<prefix>/<variant>``); the run URIs per variant."""
    runs: dict[str, list[str]] = {}
    for variant in args.variants:
        for seed in args.seeds:
            over = common + [f"train.seed={seed}", f"run.name={variant}-s{seed}"]
            if variant == "hxe-sweep":
                over.append(f"loss.supervised.level_weights={override_text(level_weights)}")
            runs.setdefault(variant, []).append(train_once(f"{prefix}/{variant}", over, log))
    return runs


def run_variants(args, suite: str, log=print) -> tuple[dict[str, list[str]], list[float]]:
    """Train every variant x seed not yet exported; returns the run URIs per variant and (d)'s level weights."""
    common = _common_overrides(args, suite, log)
    level_weights = _level_weights_d(args, common, log)
    return train_variants(args, common, level_weights, log=log), level_weights


def describe_setup(args, cfg, device: str) -> dict:
    """The setup line of the results: model, image size, steps, batch, seeds, scale, device, (d)'s weights."""
    return {"scale": args.scale, "arch": cfg.model.arch, "image_size": cfg.data.image_size, "steps": args.steps or cfg.train.steps,
            "batch_size": cfg.train.batch_size, "seeds": args.seeds, "device": device,
            "level_weights_source": "given with --level-weights" if args.level_weights else "from the val-split sweep"}


def _device_name(cfg) -> str:
    """The GPU's name for a GPU run that has one, else the number of CPUs."""
    import torch  # heavy: only once the runs are done

    if cfg.scaling.use_gpu and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()} CPUs"


def _parser() -> argparse.ArgumentParser:
    """The command line; its description is this module's docstring."""
    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="default: runs/repro (v1), runs/repro-v2 (v2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--design", choices=("v1", "v2", "v3"), default="v1",
                   help="v1: hierdino/configs/repro/ (from scratch); v2: hierdino/configs/repro/v2/ (continued from a "
                        "shared SSL base model, >= 1,500 test images per set, paired bootstrap); v3: "
                        "hierdino/configs/repro/v3/ (real PBC cells, labels at mixed depths; needs --pbc)")
    p.add_argument("--pbc", default=None, help="v3: PBC's published folder (PBC_dataset_normal_DIB) or shards made from it")
    p.add_argument("--base-steps", type=int, default=None, help="v3: override the base model's 1,200 steps (smoke checks only)")
    p.add_argument("--variants", nargs="+", default=None,
                   help="a subset of the design's variants (smoke checks; the comparison needs all of them)")
    p.add_argument("--eval-size", choices=("small", "default"), default="default",
                   help="v2: the suite size of the external sets scored (default: >= 1,500 test images each)")
    p.add_argument("--steps", type=int, default=None, help="override the pre-registered 300 steps (smoke checks only)")
    p.add_argument("--sweep-trials", type=int, default=4)
    p.add_argument("--sweep-steps", type=int, default=None)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--scale", default=None, help="lay hierdino/configs/repro/scale-NAME.yaml over every variant")
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="without --steps: pick the steps per variant that fit this many minutes (timed calibration run)")
    p.add_argument("--eval-reserve-s", type=float, default=None,
                   help="seconds of the budget kept for the evaluation (default: v1 120, v2 1500)")
    p.add_argument("--render", action="store_true", help="only rewrite OUT/results.md and OUT/plots/ from OUT/results.json")
    p.add_argument("--level-weights", type=lambda t: [float(w) for w in t.split(",")], default=None,
                   help="variant (d) weights w1,...,wD chosen elsewhere (e.g. the CPU run's val sweep) instead of sweeping")
    return p


def _write_markdown(out: str, summary: dict, probes: tuple[str, ...]) -> str:
    """Write OUT/results.md (v1 or v2 layout, as the summary says) and return its text."""
    md = v2_markdown(summary, probes) if summary.get("design") == "v2" else markdown(summary, probes)
    storage.write_bytes(storage.join(out, "results.md"), md.encode())
    return md


def write_results(args, summary: dict, probes: tuple[str, ...]) -> int:
    """OUT/results.json, results.md and plots/ of a finished comparison; prints the table."""
    storage.write_bytes(storage.join(args.out, "results.json"), json.dumps(summary, indent=2).encode())
    md = _write_markdown(args.out, summary, probes)
    plots(summary, args.out, probes)
    print(md)
    print(f"[reproduce] wrote {args.out}/results.md, results.json and plots/ in {(time.time() - args.t0) / 60:.1f} min")
    return 0


def _render(args, probes: tuple[str, ...]) -> int:
    """``--render``: rewrite OUT/results.md and the plots from OUT/results.json."""
    summary = json.loads(Path(args.out, "results.json").read_text())
    if "setup" not in summary:  # written before the setup was recorded: the design's defaults
        summary["setup"] = describe_setup(args, load_config("repro/base", scale_overrides(args.scale)), "not recorded")
    probes = tuple(summary.get("probes", probes))
    print(_write_markdown(args.out, summary, probes))
    plots(summary, args.out, probes)
    return 0


def _reproduce(args, probes: tuple[str, ...]) -> int:
    """Train the variants, evaluate them on the external test splits, write the results and plots."""
    # torch, Ray and scikit-learn: imported only for a full run, so --help and --render stay fast
    from hierdino.eval.report import evaluate

    cfg = load_config("repro/base", scale_overrides(args.scale))
    ensure_synthetic_suite(cfg)
    suite = cfg.data.synth_cache
    init_ray()
    runs, level_weights = run_variants(args, suite)
    models = [u for uris in runs.values() for u in uris]
    results = evaluate(models, [f"{suite}/{d}" for d in EXTERNAL_SETS], f"{args.out}/report", "test", probes,
                       args.bootstrap, plots=False, log=lambda *_: None)
    setup = describe_setup(args, cfg, _device_name(cfg))
    summary = summarise(results, runs, labelled_counts(suite), level_weights, (time.time() - args.t0) / 3600, setup)
    return write_results(args, summary, probes)


@user_errors(FileNotFoundError, StorageError, IngestError, ShardError, EvalDataError)  # bad paths and inputs
def main(argv=None) -> int:
    """Run the comparison (or, with ``--render``, only rewrite its table); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    designs = {"v1": VARIANTS, "v2": V2_VARIANTS, "v3": V3_VARIANTS}
    args.variants = args.variants or list(designs[args.design])
    unknown = [v for v in args.variants if v not in designs[args.design]]
    if unknown:
        parser.error(f"--variants {' '.join(unknown)}: not in design {args.design} ({', '.join(designs[args.design])})")
    if args.eval_reserve_s is None:
        args.eval_reserve_s = 120 if args.design == "v1" else 1500
    args.out = args.out or {"v1": "runs/repro", "v2": "runs/repro-v2", "v3": "runs/repro-v3"}[args.design]
    problem = upload_dir_problem(args.out, "--out")  # under `ray job submit --working-dir .`
    if problem:
        parser.error(problem)
    args.out = str(Path(args.out).absolute())
    args.t0 = time.time()
    from hierdino.eval.probes import PROBES  # scikit-learn: heavy, and --help does not need it

    if args.render:
        return _render(args, PROBES)
    try:
        if args.design == "v3":
            from hierdino.cli.reproduce_v3 import reproduce_v3

            return reproduce_v3(args, PROBES)
        if args.design == "v2":
            from hierdino.cli.reproduce_v2 import reproduce_v2  # imports this module: loaded on demand

            return reproduce_v2(args, PROBES)
        return _reproduce(args, PROBES)
    except (Stopped, KeyboardInterrupt) as e:
        print(f"[reproduce] stopped{': ' + str(e) if str(e) else ''}. Finished runs are kept; run the same command "
              "again to go on from where it stopped.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
