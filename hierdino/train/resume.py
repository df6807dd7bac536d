"""Where a run starts: resume the run directory's last complete checkpoint, refuse a config that
would not continue the same run (``config.compat``: the keys a resume may change), or
(``run.resume=false``) start fresh in a new directory.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import yaml

from hierdino import storage
from hierdino.config import Config, config_diff, config_from_dict
from hierdino.config.compat import check_compatible
from hierdino.storage import StorageOptions
from hierdino.train.checkpoint import LatestCheckpoint, latest_complete, run_uri
from hierdino.train.schedules import Schedules

logger = logging.getLogger(__name__)


@dataclass
class RunStart:
    uri: str                  # the run directory
    name: str                 # run.name (changed when run.resume=false found an existing run)
    found: LatestCheckpoint   # the checkpoint to resume from (uri None: a new run)


def saved_config(run_uri: str, options: StorageOptions | None) -> Config | None:
    """The config the run at ``run_uri`` was started with (None: no run there)."""
    path = storage.join(run_uri, "config.yaml")
    return config_from_dict(yaml.safe_load(storage.read_bytes(path, options))) if storage.exists(path, options) else None


def plan_start(cfg: Config, run_uri, options: StorageOptions | None = None, quiet: bool = False) -> RunStart:
    """Decide where ``cfg``'s run starts; with ``run.resume=false`` and an existing run, ``cfg.run.name``
    is changed to the first free ``<name>-2``, ``<name>-3``, ... (``quiet``: decide without saying it)."""
    log = (lambda *_: None) if quiet else logger.info
    uri, found = run_uri(cfg), latest_complete(run_uri(cfg), options)
    if found.uri is None and not storage.exists(storage.join(uri, "config.yaml"), options):
        return RunStart(uri, cfg.run.name, found)  # nothing there yet
    if not cfg.run.resume:
        base, k = cfg.run.name, 2
        while storage.exists(run_uri(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=f"{base}-{k}"))),
                             options):
            k += 1
        cfg.run.name = f"{base}-{k}"
        log(f"run.resume=false: {uri} exists; this run starts fresh in {run_uri(cfg)}")
        return RunStart(run_uri(cfg), cfg.run.name, LatestCheckpoint(None, 0, []))
    saved = saved_config(uri, options)
    if saved is not None and found.uri is not None:
        check_compatible(saved, cfg, uri)
        for line in config_diff(saved, cfg):
            log(f"resuming with a changed {line}")
        if saved.train.steps != cfg.train.steps:
            was, now = Schedules.from_config(saved).at(found.step), Schedules.from_config(cfg).at(found.step)
            log(f"the schedules (LR, weight decay, teacher momentum) now run to step {cfg.train.steps}: at "
                f"step {found.step} the LR goes from {was['lr']:.3g} to {now['lr']:.3g} and the teacher momentum from "
                f"{was['momentum']:.4f} to {now['momentum']:.4f}")
    for line in found.skipped:
        log(f"skipped {line}")
    return RunStart(uri, cfg.run.name, found)


def check_resume(cfg: Config, retry_s: float | None = None, unreachable_ok: bool = False) -> tuple[str, int]:
    """``plan_start`` on a copy of ``cfg`` (nothing renamed), from the driver before any cluster work:
    raises ``config.compat.ResumeError``; returns what the run would do and the step it resumes after (0: none). A
    store that cannot be reached within ``retry_s`` raises its ``StorageError`` (a run could keep no
    checkpoint), or with ``unreachable_ok`` (``--validate-only``, away from the cluster) is reported."""
    try:
        with storage.retry_window(retry_s):
            start = plan_start(config_from_dict(cfg.to_dict()), run_uri, StorageOptions.from_config(cfg),
                               quiet=True)
    except storage.StorageError as e:
        if not unreachable_ok:
            raise
        return f"run directory not checked ({e})", 0
    if start.found.uri is not None:
        return f"resumes after step {start.found.step}", start.found.step
    return f"new run in {start.uri}", 0
