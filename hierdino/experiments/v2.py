"""``jobs/reproduce.py --design v2``: the pre-registered v2 comparison (hierdino/presets/repro/v2/base.yaml).

Stages, each resumable (a run with an export is not trained again):
  1. the small training suite, and the external sets at the evaluation size (``--eval-size``);
  2. a timed calibration that fixes the steps of every run before any of them trains;
  3. the shared SSL base model (``BASE_FACTOR`` x a variant's steps), from scratch;
  4. variant (d)'s level weights (a sweep on the val splits, continuing from the base model);
  5. every variant x seed, continuing from the base model's teacher backbone;
  6. the probes on the external test splits, the paired contrasts, OUT/results.{json,md} and plots.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from hierdino import logs, storage
from hierdino.config import load_config
from hierdino.data import shards
from hierdino.data.suite import EXTERNAL_SETS, ensure_eval_suite, ensure_synthetic_suite
from hierdino.experiments import paired
from hierdino.experiments.compare import labelled_counts, summarise
from hierdino.experiments.paired import VARIANTS
from hierdino.experiments.stages import (
    REPRODUCE,
    calibrate_steps,
    describe_setup,
    device_name,
    level_weights_d,
    planned_steps,
    scale_overrides,
    train_once,
    train_variants,
    write_results,
)
from hierdino.hierarchy import load_hierarchy
from hierdino.runtime import init_ray

logger = logging.getLogger(__name__)

__all__ = ["VARIANTS", "reproduce"]

PREFIX = "repro/v2"
BASE_FACTOR = 2  # the base model trains for twice a variant's steps


def variant_and_base_steps(args, common: list[str]) -> tuple[int, int]:
    """(steps per variant, steps of the base model), fixed before anything trains and kept in OUT/plan.json.

    Variant steps: ``--steps``, else those of an earlier start of this run (plan.json), else what
    fits the budget (timed calibration), else the design's 300. The base model's steps are fixed by
    the first start (``BASE_FACTOR`` x its variant steps) and kept when ``--steps`` later changes the
    variants' (no variant may have trained then: they must all run the same steps)."""
    def calibrate() -> int:  # a sweep trial: half the steps, plus its val evaluations and Tune's start-up
        n_runs = BASE_FACTOR + len(args.variants) * len(args.seeds) + (0 if args.level_weights else args.sweep_trials)
        return calibrate_steps(args, common, n_runs, preset=f"{PREFIX}/hxe-path")
    steps, fixed = planned_steps(args, calibrate, f"{PREFIX}/base", common)
    base_steps = fixed.get("base_steps", BASE_FACTOR * steps)
    history = fixed.get("history", []) + ([{"steps": fixed["steps"], "replaced_by": steps}] if fixed and fixed["steps"] != steps else [])
    storage.write_bytes(str(Path(args.out, "plan.json")),
                        json.dumps({"steps": steps, "base_steps": base_steps, "history": history}).encode())
    return steps, base_steps


def _evaluate(args, base_uri: str, runs: dict, eval_suite: str, arch: str, image_size: int, probes) -> dict:
    """Probes of the base model, a random backbone and every variant run on the external test splits."""
    # torch and scikit-learn: imported only for a full run
    from hierdino.eval.report import evaluate

    models = [base_uri, f"random:{arch}@{image_size}"] + [u for uris in runs.values() for u in uris]
    with logs.quiet():
        return evaluate(models, [f"{eval_suite}/{d}" for d in EXTERNAL_SETS], f"{args.out}/report", "test", probes,
                        args.bootstrap, plots=False, keep_predictions=True, in_process=True)


def _test_images(eval_suite: str) -> dict[str, int]:
    """Labelled test images of each external set (the power of the comparison)."""
    return {d: shards.read_manifest(f"{eval_suite}/{d}").num_labeled("test") for d in EXTERNAL_SETS}


def reproduce(args, probes) -> int:
    """Run the v2 design end to end; writes OUT/results.json, results.md and plots/."""
    cfg = load_config(f"{PREFIX}/base", scale_overrides(args.scale))
    ensure_synthetic_suite(cfg)
    suite = cfg.data.synth_cache
    eval_suite = ensure_eval_suite(suite, args.eval_size, cfg.data.image_size)
    init_ray(verbose=args.verbose)
    common = scale_overrides(args.scale) + [f"data.synth_cache={suite}", f"run.storage={args.out}"]
    args.steps, base_steps = variant_and_base_steps(args, common)
    base_uri = train_once(f"{PREFIX}/pretrain", common + [f"train.steps={base_steps}", f"checkpoint.every_steps={base_steps}",
                                                          "run.name=base"])
    common += [f"train.steps={args.steps}", f"checkpoint.every_steps={max(1, args.steps // 2)}",
               f"model.init_weights={storage.join(base_uri, 'export', 'teacher_backbone.safetensors')}"]
    level_weights = level_weights_d(args, common, preset=f"{PREFIX}/hxe-sweep")
    runs = train_variants(args, common, level_weights, prefix=PREFIX)
    t_eval = time.time()
    results = _evaluate(args, base_uri, runs, eval_suite, cfg.model.arch, cfg.data.image_size, probes)
    logger.info(f"evaluation in {time.time() - t_eval:.0f}s", extra=REPRODUCE)
    setup = describe_setup(args, cfg, device_name(cfg)) | {"base_steps": base_steps, "test_images": _test_images(eval_suite),
                                                            "bootstrap": args.bootstrap, "eval_suite": eval_suite}
    summary = summarise(results, runs, labelled_counts(suite), level_weights, (time.time() - args.t0) / 3600, setup,
                        variants={v: VARIANTS[v] for v in args.variants})
    summary["design"], summary["probes"] = "v2", list(probes)
    summary["base"] = paired.base_summary(results["rows"], paired.run_name(base_uri), f"random-{cfg.model.arch}",
                                          probes, base_steps)
    trees = {d: load_hierarchy(results["datasets"][d]["hierarchy"]) for d in EXTERNAL_SETS}
    summary["paired"] = paired.paired_contrasts(results["predictions"], runs, probes, n=args.bootstrap, hierarchies=trees)
    return write_results(args, summary, probes)
