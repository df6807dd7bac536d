"""Ray Tune sweep of the hierarchical-loss hyperparameters, scored on external balanced accuracy (val).

  python jobs/sweep.py --config tiny-cpu --space tune_spaces/alpha.yaml --trials 4
  python jobs/sweep.py --config vits14 --space tune_spaces/level_weights.yaml --trials 32 --max-concurrent 8

Writes OUT/results.csv, OUT/results.md (sorted by ext_val_bacc, with each trial's 95% bootstrap
interval pooled over the external sets, how the winner was chosen and whether it is distinguishable
from the runner-up), OUT/best_config.yaml (takes `jobs/pretrain.py --config` as it is) and
OUT/objective.png. The winner is chosen among trials that reached the full budget: a trial ASHA
stopped early never wins. OUT defaults to <run.storage>/sweeps/<space>. Run it again to resume.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from hierdino import logs
from hierdino.cli.args import positive_int, upload_dir_problem
from hierdino.config import ConfigError, load_config
from hierdino.data.suite import ensure_synthetic_suite
from hierdino.errors import user_errors
from hierdino.runtime import init_ray
from hierdino.train.inputs import check_inputs
from hierdino.train.preflight import plan_resources, trials_at_once
from hierdino.tune.space import SpaceError, check_space, load_space
from hierdino.tune.sweep import default_out, run_sweep, searcher, sweep_overrides

logger = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    """The command line; the module docstring is its ``--help`` text."""
    p = argparse.ArgumentParser(prog="sweep.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny-cpu")
    p.add_argument("--space", required=True)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--scheduler", choices=["asha", "none"], default="asha")
    p.add_argument("--max-concurrent", type=positive_int, default=None,
                   help="trials at once (default: as many as fit on the cluster, said at start)")
    p.add_argument("--cpus-per-trial", type=float, default=None,
                   help="CPUs of each trial's training workers together (sets scaling.cpus_per_worker)")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs of each trial, fractions allowed with one worker per trial (0.25: four trials share a GPU); sets scaling.gpus_per_worker")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--search", choices=["random", "optuna"], default="random",
                   help="random sampling, or Optuna's TPE (pip install 'hierdino[optuna]')")
    p.add_argument("--seeds-per-trial", type=positive_int, default=1,
                   help="train each configuration with N seeds (train.seed, +1, ...) and score the mean (needs --scheduler none)")
    p.add_argument("--out", default=None, help="default: <run.storage>/sweeps/<space name> (S3 storage keeps them on clusters)")
    p.add_argument("--validate-only", action="store_true", help="check the config and the space; nothing is started")
    p.add_argument("--offline", action="store_true",
                   help="with --validate-only: do not read the datasets (a manifest checked away from its cluster)")
    logs.add_flags(p, verbose_help="Ray Data plans, progress bars and Ray's warnings too")
    return p


def load_checked(args):
    """The config (with the per-trial CPUs/GPUs added to ``args.overrides``) and the space, checked
    against it; raises ``ConfigError`` or ``SpaceError``."""
    cfg = load_config(args.config, args.overrides)
    workers = cfg.scaling.num_workers
    if args.cpus_per_trial is not None:
        args.overrides.append(f"scaling.cpus_per_worker={args.cpus_per_trial / workers:g}")
    if args.gpus_per_trial is not None:
        args.overrides += ["scaling.use_gpu=true", f"scaling.gpus_per_worker={args.gpus_per_trial / workers:g}"]
    cfg = load_config(args.config, args.overrides)
    space = load_space(args.space)
    if args.trials < 1:
        raise SpaceError(f"--trials must be >= 1, got {args.trials}")
    check_space(args.config, args.overrides, space)
    sweep_overrides(args.config, args.overrides, args.scheduler, args.seeds_per_trial)  # its checks, before Ray
    searcher(args.search, space)
    problem = upload_dir_problem(args.out, "--out") if args.out else upload_dir_problem(cfg.run.storage, "run.storage")
    if problem:  # `ray job submit --working-dir .`: the results and trial runs would go with Ray's session
        raise ConfigError(problem)
    if not args.offline:  # the datasets are the cluster's to reach, not a checking machine's
        check_inputs(cfg, unbuilt_suite_ok=True, eval_split="val", evaluates=True,  # every trial evaluates on val
                     retry_s=10 if args.validate_only else cfg.run.storage_retry_s)
    return cfg, space


def trials_to_run(cfg, max_concurrent: int | None, grows: bool) -> int:
    """How many trials run at once: ``--max-concurrent``, else as many as fit on the cluster (said);
    raises ``ResourcesError`` if not even one fits, since the sweep would wait forever. On a cluster
    that cannot grow (the local one this command started), more than fit is lowered to what fits:
    the extra trials' workers would take the CPUs every trial's data ingest needs."""
    from ray._private.state import total_resources_per_node  # heavy: needed only once a sweep really starts

    nodes = list(total_resources_per_node().values())
    plan_resources(cfg, nodes)
    fit = max(1, trials_at_once(cfg, nodes))
    concurrent = max_concurrent or fit
    if concurrent > fit and not grows:
        logger.info(f"--max-concurrent {max_concurrent} lowered to {fit}: only {fit} trial(s) fit on this local "
                    "cluster with the CPUs their data ingest needs (more would wait for data forever)")
        concurrent = fit
    elif concurrent > fit:
        logger.warning(f"WARNING --max-concurrent {max_concurrent} is more than the {fit} trial(s) that fit on the "
                       "cluster as it is now with the CPUs their data ingest needs: unless it grows (autoscaling), "
                       f"trials would wait for data forever; use --max-concurrent {fit} on a cluster of fixed size")
    logger.info(f"{fit} trial(s) fit on the cluster at once; running {concurrent} at a time")
    return concurrent


@user_errors(named=True)  # a config, space, data or resources error: "<kind> error: ..." and exit 2
def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logs.console(logs.level_from_flags(args.quiet, args.verbose))
    cfg, space = load_checked(args)
    if args.offline and not args.validate_only:
        print("usage error: --offline only goes with --validate-only", file=sys.stderr)
        return 2
    if args.validate_only:
        print(f"config and space OK: {args.config}, {args.space}")
        return 0
    out = args.out or default_out(cfg, space)
    ensure_synthetic_suite(cfg, evaluates=True)  # every trial evaluates (eval.every_steps, set by the sweep)
    args.overrides.append(f"data.synth_cache={cfg.data.synth_cache}")
    init_ray(verbose=args.verbose)  # with the dashboard: without it a trial ASHA stops can keep its resources
    concurrent = trials_to_run(cfg, args.max_concurrent, grows=bool(os.environ.get("RAY_ADDRESS")))
    res = run_sweep(args.config, args.space, args.trials, out, args.scheduler, concurrent, args.overrides,
                    search=args.search, seeds_per_trial=args.seeds_per_trial)
    if res.get("interrupted"):
        return 130
    print(res["table"])
    failed = sum(bool(r["error"]) for r in res["rows"])
    if failed:
        logger.warning(f"{failed} of {len(res['rows'])} trials failed (the error column of results.md; Ray Tune "
                       f"keeps each one's traceback under {out}/tune)")
    logger.info(f"sweep results: {out}/results.md; best config: {out}/best_config.yaml")
    return 0 if res.get("best") else 1


if __name__ == "__main__":
    sys.exit(main())
