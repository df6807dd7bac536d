"""Pretrain a DINOv2 student/teacher with hierarchical supervision on Ray Train.

  python jobs/pretrain.py                                   # embedded default: tiny-cpu on the synthetic suite
  python jobs/pretrain.py --config vitl14 --set data.train=[s3://bucket/matek,s3://bucket/raabin]
  python jobs/pretrain.py --config tiny-cpu --set train.steps=50 --validate-only

Under ``ray job submit`` (``RAY_ADDRESS`` set) it joins that cluster; otherwise it starts a local one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

from hierdino import logs
from hierdino.cli.args import positive_int, upload_dir_problem
from hierdino.config import ConfigError, load_config
from hierdino.data.suite import ensure_synthetic_suite
from hierdino.errors import user_errors
from hierdino.runtime import init_ray

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="pretrain.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny-cpu", help="preset name or YAML file (default: tiny-cpu)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--validate-only", action="store_true", help="check the config and exit; nothing is started")
    p.add_argument("--offline", action="store_true",
                   help="with --validate-only: do not look at run.storage, the datasets or the weights (a manifest "
                        "checked away from its cluster)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    logs.add_flags(p, verbose_help="Ray Data plans, progress bars and Ray's warnings too")
    p.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                   help="start the local cluster without Ray's dashboard (Ray Train then cannot query its state API "
                        "and says so every few seconds)")
    p.add_argument("--local-cpus", type=positive_int, default=None, metavar="N",
                   help="CPUs the local cluster may use (default: all); ignored under `ray job submit`")
    return p.parse_args(argv)


def supervision_warning(cfg, data) -> str | None:
    """``hierdino.data.mix.labelled_rows_warning`` for a run whose supervised loss is on
    (``loss.supervised.kind`` not none, weight > 0); None otherwise or without the data's description
    (``data`` None: the synthetic suite, not built yet, whose mix is two thirds labelled).

    A warning, not a ``labelled_fraction`` knob: ``data.weights`` already sets the mix, and a second
    setting for the same proportions would need a rule for when both are given; with one, the run's
    config.yaml states the exact mix it trained on. The warning prints the weights to use, and says
    nothing (changes nothing) for the mixes that work, the presets' included."""
    from hierdino.data.mix import labelled_rows_warning

    sup = cfg.loss.supervised
    if data is None or sup.kind == "none" or sup.weight <= 0:
        return None
    per_worker = cfg.train.batch_size // cfg.scaling.num_workers
    return labelled_rows_warning(data.sizes, data.labeled, data.proportions, per_worker)


def check_before_cluster(args, cfg):
    """What can be said before any cluster work (``--validate-only`` too): a run directory this config
    would not continue, inputs it cannot read (``UserError``). Returns the training data's description
    (None: not checked, or the synthetic suite, built later) and where the run would start."""
    problem = upload_dir_problem(cfg.run.storage, "run.storage")  # `ray job submit --working-dir .`
    if problem:
        raise ConfigError(problem)
    # pyarrow and torch.distributed.checkpoint: not for --help or a config error
    from hierdino.train.inputs import check_inputs
    from hierdino.train.resume import check_resume

    retry_s = 10 if args.validate_only else cfg.run.storage_retry_s  # --validate-only: no run's window
    where, resumes = (("run directory not checked (--offline)", 0) if args.offline
                      else check_resume(cfg, retry_s=retry_s, unreachable_ok=args.validate_only))
    data = None
    if not args.offline:  # the synthetic suite, when missing, is built before training
        data = check_inputs(cfg, unbuilt_suite_ok=True, resuming=resumes > 0, retry_s=retry_s)
    return data, where


def evaluate_at_end(cfg, run_dir: str) -> dict:
    """After training: the configured external sets, the bAcc table printed, the scores beside the
    training curves in TensorBoard (``final_<dataset>_<probe>_bacc``)."""
    # heavy (scikit-learn, torch): only the evaluation at the end
    from hierdino import storage
    from hierdino.data.suite import eval_set_uris
    from hierdino.eval.features import eval_center_crop, features_in_process
    from hierdino.eval.report import evaluate, markdown_table
    from hierdino.train.tracking import RunLog

    datasets = eval_set_uris(cfg)
    out = storage.join(run_dir, "eval")
    logger.info(f"evaluating {run_dir} on {', '.join(datasets)} ({cfg.eval.split} split)")
    options = storage.StorageOptions.from_config(cfg)
    res = evaluate([run_dir], datasets, out, cfg.eval.split, bootstrap_n=cfg.eval.bootstrap,
                   default_img_size=cfg.eval.image_size or cfg.data.image_size, options=options,
                   in_process=features_in_process(cfg.eval.features), hierarchies=(cfg.hierarchy.name,),
                   center_crop=eval_center_crop(cfg))
    print(markdown_table(res))
    logger.info(f"evaluation report: {storage.join(out, 'results.md')}")
    tb = RunLog(run_dir, jsonl=False, options=options)
    run = [r for r in res["rows"] if r["model"] not in ("pixels",) and not r["model"].startswith("random")]
    tb.write({f"final_{r['dataset']}_{r['probe']}_bacc": r["metrics"]["bacc"]["value"] for r in run}, step=cfg.train.steps)
    tb.close()
    return res


def say_finished(final: dict, t0: float) -> None:
    logger.info(f"finished    step {final.get('step')} in {(time.time() - t0) / 60:.1f} min; "
                f"{final.get('images_per_s', 0):.1f} images/s in the training loop")
    logger.info(f"checkpoint  {final.get('checkpoint')}")
    nodes = final.get("worker_nodes") or []
    logger.info(f"workers     {len(nodes)} on {len(set(nodes))} node(s); student parameter checksum "
                f"{final.get('start_checksum', float('nan')):.17g} at step {final.get('start_step', 0)}, "
                f"{final.get('final_checksum', float('nan')):.17g} at step {final.get('step')}")
    logger.info(f"metrics     {final['run_dir']}/metrics.jsonl; tensorboard --logdir {final['run_dir']}/tb")
    logger.info(f"run         {final['run_dir']}")
    logger.info(f"export      {final.get('export') or 'none (the run stopped before train.steps)'}")


@user_errors(named=True)  # a UserError, also from inside Ray's errors: "<kind> error: ..." and exit 2
def main(argv=None) -> int:
    args = parse_args(argv)
    logs.console(logs.level_from_flags(args.quiet, args.verbose))
    try:
        cfg = load_config(args.config, args.overrides)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    if args.offline and not args.validate_only:
        print("usage error: --offline only goes with --validate-only", file=sys.stderr)
        return 2
    data, where = check_before_cluster(args, cfg)
    if warning := supervision_warning(cfg, data):  # said before any cluster work (--validate-only too)
        logger.warning(f"WARNING: {warning}")
    if args.validate_only:
        print(f"config OK: {args.config} ({len(args.overrides)} override(s)); run {cfg.run.storage}/{cfg.run.name}: {where}")
        return 0
    from hierdino.train import launch  # heavy (Ray, torch.distributed): only a run that trains needs it

    t0 = time.time()
    init_ray(args.local_cpus, dashboard=args.dashboard, verbose=args.verbose)
    try:
        # before building data: a run that cannot fit stops in seconds (its plan is said as the run starts)
        launch.preflight(cfg, note=False)
        ensure_synthetic_suite(cfg)
        final = launch.train(cfg, preset=args.config)
    except KeyboardInterrupt:  # a second SIGTERM / SIGINT (or one before the run started): no graceful stop
        from hierdino import storage
        from hierdino.train.checkpoint import latest_complete, run_uri

        with storage.retry_window(5):  # a store that does not answer must not hold the exit for minutes
            found = latest_complete(run_uri(cfg), storage.StorageOptions.from_config(cfg))
        logger.error(f"aborted by a second signal: the steps since the last complete checkpoint are lost; it is "
                     f"{found.uri or 'none'}. Run the same command again to resume from it.")
        return 130
    if final.get("stopped_by"):
        logger.info(f"stopped by {final['stopped_by']} after step {final.get('step')}; checkpoint "
                    f"{final.get('checkpoint')}. Run the same command again to resume from it.")
        return 0
    if final.get("export") and cfg.eval.at_end and not args.no_eval:
        evaluate_at_end(cfg, final["run_dir"])
    say_finished(final, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
