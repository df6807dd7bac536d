"""Build and run the Ray Train ``TorchTrainer`` for a config: data, scaling, storage, failures, resume."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import ray
import torch

import hierdino
from hierdino import storage
from hierdino.config import Config, config_diff, load_config
from hierdino.data.ingest import CropSpec, build_train_datasets
from hierdino.data.suite import eval_set_uris
from hierdino.errors import user_error
from hierdino.hierarchy import load_hierarchy
from hierdino.runtime import quiet_ray_data
from hierdino.storage import StorageOptions
from hierdino.train.checkpoint import latest_complete, run_uri
from hierdino.train.inputs import check_inputs
from hierdino.train.preflight import check_nodes_see, preflight
from hierdino.train.resume import plan_start
from hierdino.train.stop import GracefulStop

logger = logging.getLogger(__name__)


def ordered_ingest_options():
    """Ray Train's default ingest options with ``preserve_order``: with the seeded file order and the
    step-indexed mix (``hierdino.data.mix``), a seed then fixes the batches of a one-worker run."""
    import ray.train  # heavy (seconds): Ray Train loads only where a trainer is built

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def meta_model(cfg: Config, hierarchy):
    """The run's model on the meta device (no memory for weights): for checks and sizes on the driver."""
    from hierdino.models.student_teacher import StudentTeacher  # heavy (timm): only where a trainer is built

    with torch.device("meta"):
        return StudentTeacher(cfg, hierarchy)


def check_init_weights(cfg: Config, model) -> None:
    """Load ``model.init_weights`` into the meta-device ``model``: a checkpoint that does not fit stops
    the run here, before any worker starts (``WeightsError``)."""
    for line in model.load_pretrained(cfg.model.init_weights, cfg.model.init_strict, cfg.model.init_tower,
                                      StorageOptions.from_config(cfg)):
        logger.info(line)


def model_size(model) -> str:
    """Parameter counts of the student's parts."""
    parts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.student.items()}
    return ", ".join(f"{name} {n / 1e6:.2f}M" for name, n in parts.items()) + " parameters (student; the teacher the same)"


def start_block(cfg: Config, uri: str, start_step: int, data, plan, model, preset: str | None) -> None:
    """What the run is, before it starts: run directory, config changes, data mix, model, resources."""
    changed = []
    if preset:
        base = load_config(preset)
        base.data.synth_cache = str(Path(base.data.synth_cache).expanduser())  # as ensure_synthetic_suite resolves it
        changed = config_diff(base, cfg)
    res = ray.cluster_resources()
    logger.info(f"run       {uri} ({'resuming after step ' + str(start_step) if start_step else 'new'})")
    if preset:
        logger.info(f"config    {preset}" + (f"; changed: {'; '.join(changed)}" if changed else "; as the preset"))
    logger.info(f"data      {data.summary()}; {100 * data.labeled_fraction:.0f}% of each batch labelled")
    logger.info(f"model     {cfg.model.arch} at {cfg.data.image_size} px: {model_size(model)}")
    logger.info(f"resources cluster {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU; run {plan.workers} worker(s) x "
                f"{plan.cpus_per_worker:g} CPU{f' + {cfg.scaling.gpus_per_worker:g} GPU' if plan.gpus else ''}, "
                f"ingest {plan.ingest_cpus:g} CPU per task" + (f" ({plan.note})" if plan.note else ""))
    logger.info(f"tracking  {storage.join(uri, 'metrics.jsonl')}; TensorBoard: tensorboard --logdir "
                f"{storage.join(uri, 'tb')}")
    logger.info(f"code      {Path(hierdino.__file__).parent}")  # the installed package or the job's working_dir


def build_trainer(cfg: Config, callbacks: list | None = None, preset: str | None = None, stop_flag=None,
                  free_resources: bool = True):
    """The ``TorchTrainer`` for ``cfg`` (Ray must be initialised). ``free_resources=False`` (a sweep
    trial): the preflight counts the cluster's total resources, the other trials holding the rest."""
    import ray.train  # heavy (seconds): Ray Train loads only where a trainer is built
    from ray.train.torch import TorchTrainer  # heavy: Ray Train, as above

    from hierdino.train.loop import train_loop_per_worker  # heavy (Ray Train, timm): the workers' loop

    quiet_ray_data()  # a Tune trial builds its datasets in its own process
    hierarchy = load_hierarchy(cfg.hierarchy.name)
    opts = StorageOptions.from_config(cfg)
    storage.set_retry_window(cfg.run.storage_retry_s)
    start = plan_start(cfg, run_uri, opts)  # may refuse a changed config (ResumeError) or rename the run
    uri, start_step = start.uri, start.found.step
    data = check_inputs(cfg, opts, resuming=bool(start_step))  # datasets, external sets, weights: fails now
    model = meta_model(cfg, hierarchy)
    if cfg.model.init_weights and not start_step:
        check_init_weights(cfg, model)
    plan = preflight(cfg, free=free_resources)  # before anything starts: a run that cannot fit stops here (ResourcesError)
    workers = cfg.scaling.num_workers
    per_worker = cfg.train.batch_size // workers
    datasets = build_train_datasets(data, CropSpec.from_config(cfg), per_worker, workers, start_step, cfg.train.steps,
                                    opts, num_cpus=plan.ingest_cpus, map_batch_size=min(64, per_worker))
    storage.write_bytes(storage.join(uri, "config.yaml"), cfg.to_yaml().encode(), opts)
    shared = [storage.join(u, "manifest.json") for u in data.uris] + [storage.join(uri, "config.yaml")]
    if cfg.eval.every_steps:
        shared += [storage.join(u, "manifest.json") for u in eval_set_uris(cfg)]
    check_nodes_see(shared)  # several nodes: each sees the local paths (StorageError)
    start_block(cfg, uri, start_step, data, plan, model, preset)
    fs, path = storage.resolve(cfg.run.storage, opts)
    run_config = ray.train.RunConfig(
        name=cfg.run.name, storage_path=path if storage.is_s3(cfg.run.storage) else str(Path(path)),
        storage_filesystem=fs if storage.is_s3(cfg.run.storage) else None,
        failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
        callbacks=callbacks,
    )
    scaling = ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                      resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                                            **({"GPU": cfg.scaling.gpus_per_worker} if cfg.scaling.use_gpu else {})},
                                      placement_strategy=cfg.scaling.placement_strategy)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_uri": uri, "proportions": data.proportions, "start_step": start_step,
                           "streams": list(datasets), "stop_flag": stop_flag},
        scaling_config=scaling, run_config=run_config, datasets=datasets,
        # Ordered streams: with the seeded file order and the step-indexed mix, a seed fixes the batches.
        # One worker iterates its streams itself: no streaming split, so no SplitCoordinator actor per
        # dataset (each a process of its own, seconds of start-up before the first batch on a small node).
        dataset_config=ray.train.DataConfig(datasets_to_split="all" if workers > 1 else [],
                                            execution_options=ordered_ingest_options()),
    )


def _fit_beside_the_main_thread(trainer):
    """``trainer.fit()`` in a thread of its own while the main thread waits for it. Called from the
    main thread, Ray Train's ``fit`` installs its own SIGINT handler (abort the run), replacing the
    graceful stop's; from another thread it leaves the handlers alone, and the main thread, where
    Python runs signal handlers, stays free to run them (a second signal's KeyboardInterrupt ends
    the wait; the thread is a daemon, so the process can exit)."""
    out = {}

    def run():
        try:
            out["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the main thread
            out["error"] = e

    thread = threading.Thread(target=run, name="hierdino-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in out:
        raise out["error"]
    return out["result"]


def train(cfg: Config, preset: str | None = None, graceful: bool = True) -> dict:
    """Run training to the end (or ``train.stop_at_step``); returns rank 0's final metrics.

    ``graceful`` (main thread only): SIGTERM / SIGINT end the run after the step in flight with a
    checkpoint (``hierdino.train.stop``); the result then has ``stopped_by`` set.
    """
    import ray.train  # heavy (seconds): as in build_trainer; its error class is caught below

    try:  # Ray Train raises a worker's error (a TrainingFailedError) out of fit
        if not graceful or threading.current_thread() is not threading.main_thread():
            result = build_trainer(cfg, preset=preset).fit()
            stopped_by = None
        else:
            with GracefulStop() as stop:
                result = _fit_beside_the_main_thread(build_trainer(cfg, preset=preset, stop_flag=stop.flag))
            stopped_by = stop.signal
    except ray.train.TrainingFailedError as e:
        raise user_error(e) or e  # a worker's input error reported as the driver's own would be
    ckpt = latest_complete(run_uri(cfg), StorageOptions.from_config(cfg)).uri
    final = result.return_value or {}
    if final.get("step", 0) >= cfg.train.steps:  # the signal came too late to cut the run short: it finished
        stopped_by = None
    return dict(final, run_dir=run_uri(cfg), checkpoint=ckpt, stopped_by=stopped_by)
