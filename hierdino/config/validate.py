"""Checks across keys, run after every load; each error names the keys involved and their values."""

from __future__ import annotations

from hierdino import storage
from hierdino.archs import patch_size
from hierdino.config.schema import Config, ConfigError
from hierdino.hierarchy import level_weights_for, load_hierarchy


def validate(cfg: Config) -> None:
    """Checks across keys, each naming the keys involved."""
    try:
        h = load_hierarchy(cfg.hierarchy.name)
    except Exception as e:
        raise ConfigError(f"hierarchy.name: {cfg.hierarchy.name!r}: {e}") from None
    sup = cfg.loss.supervised
    try:  # the rule for alpha / level_weights (hierarchy.py; the hierarchical loss applies it)
        level_weights_for(h, sup.alpha, sup.level_weights, sup.normalize)
    except ValueError as e:
        raise ConfigError(f"loss.supervised: {e}") from None
    for key in ("data.global_crops_scale", "data.local_crops_scale", "data.mask_ratio"):
        lo_hi = cfg.get(key)
        if len(lo_hi) != 2 or not (0 <= lo_hi[0] <= lo_hi[1] <= 1):
            raise ConfigError(f"{key}: {lo_hi} must be [low, high] with 0 <= low <= high <= 1")
    cj = cfg.data.color_jitter
    if len(cj) != 4 or not all(0 <= v <= 1 for v in cj[:3]) or not 0 <= cj[3] <= 0.5:
        raise ConfigError(f"data.color_jitter: {cj} must be [brightness, contrast, saturation, hue] with the first "
                          "three in [0, 1] and hue in [0, 0.5]")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: {cfg.optim.betas} must be two numbers in [0, 1)")
    if cfg.data.weights is not None and len(cfg.data.weights) != len(cfg.data.train):
        raise ConfigError(f"data.weights: {cfg.data.weights} needs one weight per data.train entry ({len(cfg.data.train)})")
    if cfg.train.batch_size % cfg.scaling.num_workers:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by scaling.num_workers={cfg.scaling.num_workers}"
        )
    s = cfg.scaling
    if s.use_gpu and s.num_workers > 1 and s.gpus_per_worker < 1:
        raise ConfigError(
            f"scaling.gpus_per_worker={s.gpus_per_worker:g} with scaling.num_workers={s.num_workers}: the workers of one "
            "run would share a GPU, which NCCL refuses (two ranks on one device); give each worker a whole GPU "
            "(sweeps: --gpus-per-trial of at least scaling.num_workers), or run one worker")
    if cfg.data.local_crops_size > cfg.data.image_size:
        raise ConfigError(f"data.local_crops_size={cfg.data.local_crops_size} exceeds data.image_size={cfg.data.image_size}")
    patch = patch_size(cfg.model.arch)
    used = ("data.image_size", "eval.image_size") + (("data.local_crops_size",) if cfg.data.local_crops_number else ())
    bad = [f"{key}={cfg.get(key)} (e.g. {max(patch, cfg.get(key) // patch * patch)} or {(cfg.get(key) // patch + 1) * patch})"
           for key in used if patch and cfg.get(key) is not None and cfg.get(key) % patch]
    if bad:
        raise ConfigError(f"not a multiple of model.arch={cfg.model.arch!r}'s patch size {patch}: {'; '.join(bad)}")
    if cfg.train.stop_at_step is not None and cfg.train.stop_at_step > cfg.train.steps:
        raise ConfigError(f"train.stop_at_step={cfg.train.stop_at_step} exceeds train.steps={cfg.train.steps}")
    problem = storage.name_problem(cfg.run.name)  # the run directory's name, under run.storage
    if problem:
        raise ConfigError(f"run.name: {cfg.run.name!r} {problem}")
    if cfg.optim.momentum_teacher > cfg.optim.momentum_teacher_end:
        raise ConfigError(
            f"optim.momentum_teacher={cfg.optim.momentum_teacher} exceeds optim.momentum_teacher_end={cfg.optim.momentum_teacher_end}"
        )
