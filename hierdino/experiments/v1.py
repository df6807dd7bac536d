"""``jobs/reproduce.py --design v1``: the pre-registered comparison of issue #8 (hierdino/presets/repro/base.yaml).

Every variant trains from scratch on the synthetic training suite: (a) SSL only, (b) flat CE, (c) HXE
alpha=0.5, (d) HXE with level weights swept on the val splits; each over ``--seeds``, then the probes
on the external test splits and the seed statistics of ``hierdino.experiments.compare``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from hierdino import logs, storage
from hierdino.config import load_config
from hierdino.data.suite import EXTERNAL_SETS, ensure_synthetic_suite
from hierdino.experiments.compare import VARIANTS, labelled_counts, summarise
from hierdino.experiments.stages import (
    REPRODUCE,
    calibrate_steps,
    describe_setup,
    device_name,
    level_weights_d,
    scale_overrides,
    train_variants,
    write_results,
)
from hierdino.runtime import init_ray

logger = logging.getLogger(__name__)

__all__ = ["VARIANTS", "reproduce", "run_variants"]


def _common_overrides(args, suite: str) -> list[str]:
    """Overrides shared by every run (scale, suite, storage, steps); fixes ``args.steps``."""
    common = scale_overrides(args.scale) + [f"data.synth_cache={suite}", f"run.storage={args.out}"]
    plan = Path(args.out, "plan.json")  # the calibrated steps, kept: a rerun must train the same steps
    if not args.steps and args.time_budget_min and plan.exists():
        args.steps = json.loads(plan.read_text())["steps"]
        logger.info(f"steps per variant fixed by the first start of this run: {args.steps} ({plan})", extra=REPRODUCE)
    elif not args.steps and args.time_budget_min:
        args.steps = calibrate_steps(args, common, len(args.variants) * len(args.seeds))
        storage.write_bytes(str(plan), json.dumps({"steps": args.steps}).encode())
    if args.steps:
        common += [f"train.steps={args.steps}", f"checkpoint.every_steps={max(1, args.steps // 2)}"]
    args.steps = load_config("repro/base", common).train.steps
    return common


def run_variants(args, suite: str) -> tuple[dict[str, list[str]], list[float]]:
    """Train every variant x seed not yet exported; returns the run URIs per variant and (d)'s level weights."""
    common = _common_overrides(args, suite)
    level_weights = level_weights_d(args, common)
    return train_variants(args, common, level_weights), level_weights


def reproduce(args, probes) -> int:
    """Train the variants, evaluate them on the external test splits, write the results and plots."""
    # torch, Ray and scikit-learn: imported only for a full run, so --help and --render stay fast
    from hierdino.eval.report import evaluate

    cfg = load_config("repro/base", scale_overrides(args.scale))
    ensure_synthetic_suite(cfg)
    suite = cfg.data.synth_cache
    init_ray(verbose=args.verbose)
    runs, level_weights = run_variants(args, suite)
    models = [u for uris in runs.values() for u in uris]
    with logs.quiet():
        results = evaluate(models, [f"{suite}/{d}" for d in EXTERNAL_SETS], f"{args.out}/report", "test", probes,
                           args.bootstrap, plots=False)
    setup = describe_setup(args, cfg, device_name(cfg))
    summary = summarise(results, runs, labelled_counts(suite), level_weights, (time.time() - args.t0) / 3600, setup)
    return write_results(args, summary, probes)
