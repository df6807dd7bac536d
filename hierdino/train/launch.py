"""Build and run the Ray Train ``TorchTrainer`` for a config: data, scaling, storage, failures, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hierdino.config import Config
from hierdino.data import storage
from hierdino.data.ingest import CropSpec, build_train_datasets, default_train_uris, describe_train_data, storage_options
from hierdino.hierarchy import load_hierarchy


def run_uri(cfg: Config) -> str:
    """``<run.storage>/<run.name>``, local paths made absolute."""
    base = cfg.run.storage
    if not storage.is_s3(base):
        base = str(Path(base).expanduser().absolute())
    return storage.join(base, cfg.run.name)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster of ``RAY_ADDRESS`` (``ray job submit``), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", num_cpus=num_cpus, configure_logging=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def ensure_synthetic_suite(cfg: Config, log=print) -> None:
    """Build the small synthetic suite into ``data.synth_cache`` when the default data is missing."""
    from hierdino.data.suite import SUITE_NAMES, build_suite, suite_ready

    cache = str(Path(cfg.data.synth_cache).expanduser())
    if not suite_ready(cache, SUITE_NAMES):
        log(f"[hierdino] building the small synthetic suite ({cfg.data.image_size} px) into {cache}")
        build_suite(cache, "small", cfg.data.image_size, seed=0, log=log)
    cfg.data.synth_cache = cache


def read_progress(uri: str) -> dict:
    path = storage.join(uri, "progress.json")
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else {"step": 0}


def ordered_ingest_options():
    """Ray Train's default ingest options with ``preserve_order``: with the seeded file order and the
    step-indexed mix (``hierdino.data.mix``), a seed then fixes the batches of a one-worker run."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def check_init_weights(cfg: Config, hierarchy, log=print) -> None:
    """Load ``model.init_weights`` into a model on the meta device (no memory for weights): a checkpoint
    that does not fit stops the run here, before any worker starts (``WeightsError``)."""
    import torch

    from hierdino.models.student_teacher import StudentTeacher

    with torch.device("meta"):
        model = StudentTeacher(cfg, hierarchy)
    for line in model.load_pretrained(cfg.model.init_weights, cfg.model.init_strict, cfg.model.init_tower):
        log(f"[hierdino] {line}")


def build_trainer(cfg: Config, log=print, callbacks: list | None = None):
    """The ``TorchTrainer`` for ``cfg`` (Ray must be initialised)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from hierdino.train.loop import train_loop_per_worker

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    hierarchy = load_hierarchy(cfg.hierarchy.name)
    opts = storage_options(cfg)
    uris = cfg.data.train or default_train_uris(cfg)
    data = describe_train_data(uris, hierarchy, cfg.data.weights, opts)
    uri = run_uri(cfg)
    progress = read_progress(uri)
    if progress["step"] and not cfg.checkpoint.resume:
        raise FileExistsError(f"run {uri} already has checkpoints (step {progress['step']}); choose another run.name "
                              "or set checkpoint.resume=true")
    if cfg.model.init_weights and not progress["step"]:
        check_init_weights(cfg, hierarchy, log)
    workers = cfg.scaling.num_workers
    per_worker = cfg.train.batch_size // workers
    datasets = build_train_datasets(data, CropSpec.from_config(cfg), per_worker, workers, progress["step"], cfg.train.steps,
                                    opts, num_cpus=cfg.data.num_cpus_per_map, map_batch_size=min(64, per_worker))
    storage.write_bytes(storage.join(uri, "config.yaml"), cfg.to_yaml().encode())
    log(f"[hierdino] data: {data.summary()}; {100 * data.labeled_fraction:.0f}% of each batch labelled"
        + (f"; resuming after step {progress['step']}" if progress["step"] else ""))
    fs, path = storage.resolve(cfg.run.storage, opts)
    run_config = ray.train.RunConfig(
        name=cfg.run.name, storage_path=path if storage.is_s3(cfg.run.storage) else str(Path(path)),
        storage_filesystem=fs if storage.is_s3(cfg.run.storage) else None,
        failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        callbacks=callbacks,
    )
    scaling = ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                      resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
                                      placement_strategy=cfg.scaling.placement_strategy)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_uri": uri, "proportions": data.proportions,
                           "streams": list(datasets)},
        scaling_config=scaling, run_config=run_config, datasets=datasets,
        # Ordered streams: with the seeded file order and the step-indexed mix, a seed fixes the batches.
        dataset_config=ray.train.DataConfig(execution_options=ordered_ingest_options()),
    )


def train(cfg: Config, log=print) -> dict:
    """Run training to the end (or ``train.stop_at_step``); returns rank 0's final metrics."""
    trainer = build_trainer(cfg, log)
    result = trainer.fit()
    if result.error:
        raise result.error
    return dict(result.return_value or {}, run_dir=run_uri(cfg))
