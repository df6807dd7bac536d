"""The stages every reproduction design is built from: the scale overlay, the timed calibration of the
steps, variant (d)'s level-weight sweep, training a run once (resumable), training every variant x seed,
the setup line, and writing or re-rendering OUT/results.{json,md} and OUT/plots/.

The designs (``v1``, ``v2``, ``v3`` in this package) chain these stages; ``hierdino/cli/reproduce.py``
is their command line. ``args`` is that command line's namespace (``out``, ``t0``, ``seeds``,
``variants``, ``steps``, ``time_budget_min``, ...).
"""

from __future__ import annotations

import json
import logging
import os
import time
from importlib import resources
from pathlib import Path

from hierdino import logs, storage
from hierdino.config import load_config, override_text, preset_overrides
from hierdino.experiments import compare, paired, report_v3
from hierdino.storage import StorageOptions

logger = logging.getLogger(__name__)
REPRODUCE = logs.tag("reproduce")  # extra= of this job's own lines: [reproduce] ...


def scale_overrides(name: str | None) -> list[str]:
    """``hierdino/presets/repro/scale-NAME.yaml`` as ``key.sub=value`` overrides (empty without a scale)."""
    if not name:
        return []
    repro = resources.files("hierdino.presets") / "repro"
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


def planned_steps(args, calibrate, default_preset: str, common: list[str]) -> tuple[int, dict]:
    """Steps per variant, fixed before any variant trains: ``--steps``, else those of an earlier start
    of this run (OUT/plan.json), else ``calibrate()`` (what fits ``--time-budget-min``), else the
    design's own (``default_preset``'s ``train.steps``). Returns them and the earlier plan ({}: none);
    the design writes its plan back."""
    plan = Path(args.out, "plan.json")
    fixed = json.loads(plan.read_text()) if plan.exists() else {}
    if args.steps:
        return args.steps, fixed
    if fixed:
        logger.info(f"steps per variant fixed by the first start of this run: {fixed['steps']} ({plan})", extra=REPRODUCE)
        return fixed["steps"], fixed
    if args.time_budget_min:
        return calibrate(), fixed
    return load_config(default_preset, common).train.steps, fixed


def calibrate_steps(args, common: list[str], n_runs: float, preset: str = "repro/hxe-alpha0.5") -> int:
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
    with logs.quiet():
        train(cfg)
    wall = time.time() - t0
    recs = [json.loads(line) for line in storage.read_bytes(storage.join(run_uri(cfg), "metrics.jsonl")).decode().splitlines()]
    left = args.time_budget_min * 60 - (time.time() - args.t0) - args.eval_reserve_s
    steps, step_s, overhead = steps_for_budget(recs, cfg.train.batch_size, wall, left, n_runs)
    logger.info(f"calibration: {cfg.train.batch_size / step_s:.0f} img/s ({step_s:.3f} s/step), start-up "
                f"{overhead:.0f}s per run, {left:.0f}s left for {n_runs:g} runs -> {steps} steps each", extra=REPRODUCE)
    if steps < 50:
        raise SystemExit(f"reproduce.py: --time-budget-min {args.time_budget_min} leaves {steps} steps per run (< 50); "
                         f"raise the budget or use fewer --seeds")
    return steps


def level_weights_d(args, common: list[str], preset: str = "repro/hxe-sweep") -> list[float]:
    """Variant (d)'s level weights: ``--level-weights``, else the best of a sweep on the val splits (resumable)."""
    if args.level_weights:
        logger.info(f"(d) level weights as given: {args.level_weights}", extra=REPRODUCE)
        return args.level_weights
    sweep_dir = f"{args.out}/sweep-level-weights"
    best = Path(sweep_dir, "best_config.yaml")
    if not best.exists():
        # Ray Tune and torch: imported only when sweeping
        from hierdino.tune.sweep import run_sweep

        logger.info(f"sweep of the level weights on the val splits ({args.sweep_trials} trials)", extra=REPRODUCE)
        steps = args.sweep_steps or args.steps // 2
        with logs.quiet():
            res = run_sweep(preset, str(Path(__file__).resolve().parents[2] / "tune_spaces/level_weights.yaml"),
                            args.sweep_trials, sweep_dir, "asha", 1,
                            common + [f"train.steps={steps}", f"checkpoint.every_steps={steps}",
                                      f"eval.every_steps={max(1, steps // 3)}"])
        if res.get("interrupted"):  # no best_config.yaml: the next run resumes the sweep
            raise Stopped(f"the level-weight sweep ({res['how']})")
    level_weights = load_config(str(best)).loss.supervised.level_weights
    logger.info(f"(d) level weights from the sweep: {[round(w, 3) for w in level_weights]}", extra=REPRODUCE)
    return level_weights


class Stopped(Exception):
    """A stage stopped by SIGINT / SIGTERM (its run checkpointed, or its sweep saved): the comparison stops too."""


def train_once(preset: str, overrides: list[str]) -> str:
    """Train ``preset`` with ``overrides`` unless its run already has an export of this config (the
    same recipe and steps); returns the run URI. A run of another config is
    refused (``ResumeError`` naming the keys, or the steps); a run stopped by a signal raises ``Stopped``."""
    # torch and Ray: imported only when training, so --help and --render stay fast
    from hierdino.config.compat import ResumeError, check_compatible
    from hierdino.train.checkpoint import run_uri
    from hierdino.train.launch import train
    from hierdino.train.resume import saved_config

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
    with logs.quiet():
        final = train(cfg)
    if final.get("stopped_by"):
        raise Stopped(f"{cfg.run.name} by {final['stopped_by']} after step {final.get('step')} (checkpoint "
                      f"{final.get('checkpoint')})")
    logger.info(f"trained {cfg.run.name} in {time.time() - t0:.0f}s", extra=REPRODUCE)
    return uri


def train_variants(args, common: list[str], level_weights, prefix: str = "repro",
                   per_variant=lambda variant: []) -> dict[str, list[str]]:
    """Train every variant x seed of ``args`` (presets ``<prefix>/<variant>``, with ``per_variant(variant)``'s
    overrides); the run URIs per variant."""
    runs: dict[str, list[str]] = {}
    for variant in args.variants:
        for seed in args.seeds:
            over = common + per_variant(variant) + [f"train.seed={seed}", f"run.name={variant}-s{seed}"]
            if variant == "hxe-sweep":
                over.append(f"loss.supervised.level_weights={override_text(level_weights)}")
            runs.setdefault(variant, []).append(train_once(f"{prefix}/{variant}", over))
    return runs


def describe_setup(args, cfg, device: str) -> dict:
    """The setup line of the results: model, image size, steps, batch, seeds, scale, device, (d)'s weights."""
    return {"scale": args.scale, "arch": cfg.model.arch, "image_size": cfg.data.image_size, "steps": args.steps or cfg.train.steps,
            "batch_size": cfg.train.batch_size, "seeds": args.seeds, "device": device,
            "level_weights_source": "given with --level-weights" if args.level_weights else "from the val-split sweep"}


def device_name(cfg) -> str:
    """The GPU's name for a GPU run that has one, else the number of CPUs."""
    import torch  # heavy: only once the runs are done

    if cfg.scaling.use_gpu and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()} CPUs"


def write_report(out: str, summary: dict, probes: tuple[str, ...]) -> str:
    """Write OUT/results.md and OUT/plots/ in the layout of the summary's design (v1, v2 or v3); returns the text."""
    design = summary.get("design", "v1")
    if design == "v3":
        md = report_v3.markdown(summary)
    else:
        md = paired.markdown(summary, probes) if design == "v2" else compare.markdown(summary, probes)
    storage.write_bytes(storage.join(out, "results.md"), md.encode())
    if design == "v3":
        report_v3.plot(summary, out)
    else:
        compare.plots(summary, out, probes)
    return md


def write_results(args, summary: dict, probes: tuple[str, ...]) -> int:
    """OUT/results.json, results.md and plots/ of a finished comparison; prints the table."""
    storage.write_bytes(storage.join(args.out, "results.json"), json.dumps(summary, indent=2).encode())
    print(write_report(args.out, summary, probes))
    logger.info(f"wrote {args.out}/results.md, results.json and plots/ in {(time.time() - args.t0) / 60:.1f} min",
                extra=REPRODUCE)
    return 0


def render(args, probes: tuple[str, ...]) -> int:
    """``--render``: rewrite OUT/results.md and the plots from OUT/results.json."""
    summary = json.loads(Path(args.out, "results.json").read_text())
    if "setup" not in summary:  # written before the setup was recorded: the design's defaults
        summary["setup"] = describe_setup(args, load_config("repro/base", scale_overrides(args.scale)), "not recorded")
    print(write_report(args.out, summary, tuple(summary.get("probes", probes))))
    return 0
