"""The Ray Tune driver of a sweep: each trial is a short pretrain scored on the external **val**
splits. It owns the trial function, the per-seed scoring of a trial, where a sweep writes, the
searcher and scheduler, and starting or resuming the tuner; the search-space file format lives in
``hierdino.tune.space``, the result tables, best-trial choice and plots in ``hierdino.tune.report``.

Each trial is a function trainable that starts its own ``TorchTrainer`` (Ray Train V2) with the
trial's overrides; ``TuneReportCallback`` forwards the training reports, which carry the objective
(``hierdino.eval.OBJECTIVE``) every ``eval.every_steps`` so ASHA can stop bad trials early.
Notes for Ray 2.60: the trial drivers reserve no CPU (``tune.with_resources``) and
``max_concurrent_trials`` keeps trial drivers from queueing for the workers' resources; the
dashboard stays on, since without it a trial stopped by ASHA can leave its Train resources
reserved (ray-project/ray #54305).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
from pathlib import Path

from hierdino import logs, storage
from hierdino.config import load_config, override_text
from hierdino.eval import OBJECTIVE
from hierdino.storage import StorageOptions
from hierdino.tune.report import write_outputs
from hierdino.tune.space import Space, SpaceError, check_space, load_space, trial_overrides

logger = logging.getLogger(__name__)


def _trial(config: dict) -> None:
    """The function trainable: one short pretrain with the trial's overrides (``seeds`` > 1: one per
    seed, one after the other, scored by their mean; see ``seed_mean``)."""
    from ray import tune  # Ray is heavy: imported only where a sweep runs
    from ray.tune.integration.ray_train import TuneReportCallback  # likewise Ray

    from hierdino.train.checkpoint import run_uri  # torch.distributed: only trial processes need it
    from hierdino.train.launch import build_trainer  # Ray Train and the data pipeline: trial processes only

    logs.console()  # a Ray worker: its lines (the training's, a storage retry) at the sweep's level
    ctx = tune.get_context()
    over = trial_overrides(config["sample"], config["fixed"])
    overrides = list(config["base_overrides"]) + [f"{k}={override_text(v)}" for k, v in over.items()] + [
        f"run.storage={config['trials_dir']}", f"run.name={ctx.get_trial_id()}"]
    cfg = load_config(config["base"], overrides)
    seeds = config.get("seeds", 1)
    if seeds == 1:
        runs = [(cfg, [TuneReportCallback()])]
    else:
        runs = [(load_config(config["base"], overrides + [f"train.seed={cfg.train.seed + i}",
                                                          f"run.name={ctx.get_trial_id()}-seed{i}"]), None)
                for i in range(seeds)]
    histories = []
    for run_cfg, callbacks in runs:
        with logs.quiet():  # each trial's start-up lines would repeat the sweep's
            trainer = build_trainer(run_cfg, callbacks=callbacks, free_resources=False)
        result = trainer.fit()  # raises a run's error
        histories.append(eval_history(run_uri(run_cfg), run_cfg))
    final = result.return_value or {}
    if seeds > 1:
        for step, values in seed_mean(histories):
            tune.report({OBJECTIVE: values[0], f"{OBJECTIVE}_lo": values[1], f"{OBJECTIVE}_hi": values[2], "step": step,
                         "seeds": seeds})
    elif OBJECTIVE in final:  # normally already reported at the last step; ASHA ends trials at max_t
        keys = (OBJECTIVE, f"{OBJECTIVE}_lo", f"{OBJECTIVE}_hi")
        tune.report({**{k: final[k] for k in keys if k in final}, "step": final.get("step")})


def eval_history(uri: str, cfg) -> dict[int, tuple[float, float, float]]:
    """``{step: (objective, lo, hi)}`` at the run's evaluation steps, read from its ``metrics.jsonl``."""
    out = {}
    for line in storage.read_bytes(storage.join(uri, "metrics.jsonl"), StorageOptions.from_config(cfg)).decode().splitlines():
        rec = json.loads(line)
        step = rec.get("step")
        fresh = step is not None and (step % cfg.eval.every_steps == 0 or step == cfg.train.steps)
        if fresh and OBJECTIVE in rec:
            out[int(step)] = (rec[OBJECTIVE], rec.get(f"{OBJECTIVE}_lo", math.nan), rec.get(f"{OBJECTIVE}_hi", math.nan))
    return out


def seed_mean(histories: list[dict]) -> list[tuple[int, tuple[float, float, float]]]:
    """Per evaluation step every seed reached: the mean objective over seeds and a 95% interval
    that counts both noises, the evaluation's and the seed's:
    ``mean +- 1.96 * sqrt(sum_i sigma_i^2 / n^2 + s^2 / n)``, with ``sigma_i`` = seed i's bootstrap
    half-width / 1.96 and ``s`` the standard deviation of the seeds' values."""
    steps = sorted(set.intersection(*(set(h) for h in histories)))
    out = []
    for step in steps:
        vals = [h[step] for h in histories]
        n = len(vals)
        mean = sum(v[0] for v in vals) / n
        boot = sum(((v[2] - v[1]) / 2 / 1.96) ** 2 for v in vals) / n ** 2
        seed_var = sum((v[0] - mean) ** 2 for v in vals) / (n - 1) if n > 1 else 0.0
        half = 1.96 * math.sqrt(boot + seed_var / n)
        out.append((step, (mean, mean - half, mean + half)))
    return out


def default_out(cfg, space: Space) -> str:
    """``<run.storage>/sweeps/<space>``: on S3 storage the results outlive the pod that ran the sweep."""
    base = cfg.run.storage if storage.is_s3(cfg.run.storage) else str(Path(cfg.run.storage).expanduser().absolute())
    return storage.join(base, "sweeps", space.name)


def searcher(search: str, space: Space, seed: int = 0):
    """``None`` (Tune's random sampling) or Ray Tune's Optuna searcher (TPE), which needs the extra."""
    if search == "random":
        return None
    if search != "optuna":
        raise SpaceError(f"--search must be random or optuna, got {search!r}")
    grid = [k for k, p in space.params.items() if p["dist"] == "grid"]
    if grid:
        raise SpaceError(f"{space.source}: dist grid ({', '.join(grid)}) enumerates values; a searcher proposes them. "
                         "Use --search random, or dist choice")
    try:
        import optuna  # an optional extra: hierdino[optuna]
        from ray.tune.search.optuna import OptunaSearch  # needs Optuna, hence imported only here
    except ImportError:
        raise SpaceError("--search optuna needs Optuna: pip install 'hierdino[optuna]'") from None
    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))


def scheduler_for(scheduler: str, cfg):
    """ASHA with a rung at every evaluation up to the training budget, or ``None`` for ``"none"``."""
    if scheduler == "none":
        return None
    if scheduler != "asha":
        raise SpaceError(f"scheduler must be asha or none, got {scheduler!r}")
    from ray.tune.schedulers import ASHAScheduler  # Ray is heavy: imported only where a sweep runs

    return ASHAScheduler(time_attr="step", max_t=cfg.train.steps, grace_period=cfg.eval.every_steps, reduction_factor=2)


def sweep_overrides(base: str, base_overrides: list[str] | None, scheduler: str, seeds_per_trial: int) -> list[str]:
    """The base overrides every trial gets: evaluation on the val splits at regular steps (and, with
    several seeds per trial, a log line at each of them), no final test evaluation."""
    base_overrides = list(base_overrides or [])
    cfg = load_config(base, base_overrides)
    if not cfg.eval.every_steps:
        base_overrides.append(f"eval.every_steps={max(1, cfg.train.steps // 4)}")
    base_overrides.append("eval.split=val")
    base_overrides.append("eval.at_end=false")
    if seeds_per_trial > 1:
        if scheduler == "asha":
            raise SpaceError("--seeds-per-trial > 1 needs --scheduler none: ASHA compares trials at its rungs while "
                             "they train, and a seed mean exists only once every seed of a trial has run")
        every = load_config(base, base_overrides).eval.every_steps
        base_overrides.append(f"train.log_every={every}")  # every evaluation step is a logged step
    cfg = load_config(base, base_overrides)
    if scheduler == "asha" and cfg.eval.every_steps > cfg.train.steps:
        raise SpaceError(f"eval.every_steps={cfg.eval.every_steps} is more than train.steps={cfg.train.steps}: ASHA's "
                         "first rung (an evaluation) would never come; lower eval.every_steps")
    return base_overrides


def _tuner(trainable, param_space: dict, space: Space, out_path: str, tune_config, definition: dict):
    """Tune's tuner for the sweep under ``out_path``: the saved experiment if there is one, else a new
    one. ``definition`` (what the sweep is: config, overrides, space, trials, scheduler, search) is
    kept in ``OUT/sweep.json``; a rerun with another one is refused, naming what differs: Tune would
    resume the saved sweep as it was, and its results would be written under the new settings."""
    from ray import tune  # Ray is heavy: imported only where a sweep runs

    exp_dir = storage.join(out_path, "tune")
    saved_uri = storage.join(out_path, "sweep.json")
    saved = json.loads(storage.read_bytes(saved_uri)) if storage.exists(saved_uri) else None
    if saved is not None and saved != definition:
        changed = [f"{k}: {saved.get(k)!r} -> {definition.get(k)!r}" for k in sorted(set(saved) | set(definition))
                   if saved.get(k) != definition.get(k)]
        raise SpaceError(f"{out_path} holds a sweep defined otherwise ({'; '.join(changed)}): run the same command "
                         "as before to resume or rewrite it, or give another --out")
    if tune.Tuner.can_restore(storage.join(exp_dir, space.name)):
        logger.info(f"resuming the sweep in {exp_dir}/{space.name}")
        return tune.Tuner.restore(storage.join(exp_dir, space.name), trainable, resume_errored=True)
    storage.write_bytes(saved_uri, json.dumps(definition, indent=2).encode())
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=tune.RunConfig(name=space.name, storage_path=exp_dir))


class SweepStop:
    """SIGINT / SIGTERM to a sweep's driver (main thread): Tune's own graceful stop (it saves the
    experiment and returns from ``fit``; asked with SIGUSR1, as its SIGINT handler is turned off), and
    ``signal`` says the sweep was interrupted (Tune marks a stopped trial as if it had finished). A
    second signal, or one before Tune listens, aborts (KeyboardInterrupt)."""

    def __init__(self):
        self.signal, self.previous = None, {}

    def _handler(self, signum, frame):
        if self.signal is not None or signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        logger.info(f"{self.signal}: stopping the sweep with its state saved (send it again to abort)")
        os.kill(os.getpid(), signal.SIGUSR1)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
            self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
            self.previous[signal.SIGUSR1] = signal.getsignal(signal.SIGUSR1)  # Tune leaves its own installed
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        if self.previous:
            if self.env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self.env
        return False


def run_sweep(base: str, space_path: str, trials: int, out: str, scheduler: str = "asha", max_concurrent: int = 1,
              base_overrides: list[str] | None = None, search: str = "random", trainable=None,
              seeds_per_trial: int = 1) -> dict:
    """Run (or resume) a sweep under ``out``; writes results.csv/.md, best_config.yaml and objective.png.

    ``trainable``: the function each trial runs (default: a short pretrain, ``_trial``); tests give
    one that reports without training, to check selection through the real Tune machinery.
    """
    from ray import tune  # Ray is heavy: imported only where a sweep runs

    space = load_space(space_path)
    user_overrides = list(base_overrides or [])  # what best_config.yaml keeps: not the sweep's own evaluation settings
    base_overrides = sweep_overrides(base, base_overrides, scheduler, seeds_per_trial)
    cfg = load_config(base, base_overrides)
    levels = check_space(base, base_overrides, space)
    remote = storage.is_s3(out)  # on a cluster, sweep outputs and trial runs go to shared storage
    out_path = out.rstrip("/") if remote else str(Path(out).expanduser().absolute())
    if not remote:
        os.makedirs(out_path, exist_ok=True)
    sched = scheduler_for(scheduler, cfg)
    param_space = {"sample": space.tune_space(levels), "fixed": space.fixed, "base": base, "seeds": seeds_per_trial,
                   "base_overrides": base_overrides, "trials_dir": storage.join(out_path, "trials")}
    # A trial driver only waits on its TorchTrainer: it holds no CPU (a bundle needs some resource,
    # hence 1 MiB of memory). Even 0.01 CPU left the trial's Ray Data unable to start on 2 CPUs.
    trainable = tune.with_resources(trainable or _trial, {"cpu": 0, "memory": 2 ** 20})
    tune_config = tune.TuneConfig(metric=OBJECTIVE, mode="max", num_samples=trials, scheduler=sched,
                                  search_alg=searcher(search, space), max_concurrent_trials=max_concurrent)
    definition = json.loads(json.dumps({  # JSON types, as read back from sweep.json
        "config": base, "overrides": user_overrides, "space": {"name": space.name, "params": space.params,
                                                               "fixed": space.fixed},
        "trials": trials, "scheduler": scheduler, "search": search, "seeds_per_trial": seeds_per_trial}))
    tuner = _tuner(trainable, param_space, space, out_path, tune_config, definition)
    with SweepStop() as stop:
        grid = tuner.fit()
    finished = grid.num_terminated + grid.num_errors
    expected = trials * math.prod(len(p["values"]) for p in space.params.values() if p["dist"] == "grid")
    if stop.signal or finished < max(expected, len(grid)):  # Tune saved the experiment and returned
        how = f"stopped by {stop.signal}" if stop.signal else f"interrupted with {finished} of {expected} trials finished"
        logger.info(f"the sweep was {how}: no results written; run the same command again to resume it")
        return {"interrupted": True, "how": how}
    return write_outputs(grid, base, user_overrides, space, out_path, cfg.train.steps)
