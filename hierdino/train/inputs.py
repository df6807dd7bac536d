"""What a run reads, checked on the driver before any cluster work: its training datasets (manifests
and shard footers, labels against the hierarchy), its external evaluation sets (usable by the
probes), and the file its ``model.init_weights`` names.

``jobs/pretrain.py`` and ``jobs/sweep.py`` run these checks before Ray starts (``--validate-only``
too; a sweep with its split, ``val``), and the trainer again once the synthetic suite is built.
"""

from __future__ import annotations

from hierdino import storage
from hierdino.data.ingest import TrainData, describe_train_data
from hierdino.data.suite import (
    TRAIN_SETS,
    TRAINING_SETS,
    eval_set_uris,
    resolve_dataset,
    runs_evaluation,
    suite_dir,
    suite_ready,
    suite_sets_needed,
)
from hierdino.eval import EvalDataError
from hierdino.eval.sets import check_probe_sets
from hierdino.hierarchy import load_hierarchy
from hierdino.storage import StorageOptions


def check_inputs(cfg, options: StorageOptions | None = None, unbuilt_suite_ok: bool = False,
                 eval_split: str | None = None, evaluates: bool | None = None,
                 resuming: bool = False, retry_s: float | None = None) -> TrainData | None:
    """Raise ``IngestError`` / ``ShardError`` / ``EvalDataError`` / ``StorageError`` naming what is
    wrong; returns the training data's description (None when it is the synthetic suite, not built
    yet, or built by another version, and ``unbuilt_suite_ok``: it will be built). ``eval_split`` /
    ``evaluates`` override the config's (a sweep always evaluates, on ``val``). A ``resuming`` run
    reads no ``init_weights`` (its weights come from its checkpoint), so they are not checked.
    ``retry_s``: how long an unreachable store is retried (default: the current window)."""
    options = options or StorageOptions.from_config(cfg)
    cache = suite_dir(cfg)
    evaluates = runs_evaluation(cfg) if evaluates is None else evaluates
    to_build = suite_sets_needed(cfg, evaluates) if unbuilt_suite_ok else ()

    def pending(uri: str) -> bool:  # a suite dataset the run builds before it trains
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        return name in to_build and uri == resolve_dataset(name, cache) and not suite_ready(cache, (name,), options)

    if evaluates and TRAINING_SETS in cfg.eval.datasets and not cfg.data.train:
        raise EvalDataError("eval.datasets: 'train' scores the run's own data.train sets, but data.train is empty "
                            "(the synthetic suite); give --set data.train=[<shards>] (the pbc-cpu preset needs the "
                            "PBC shards) or name the sets to score")
    with storage.retry_window(retry_s):
        uris = cfg.data.train or [storage.join(cache, n) for n in TRAIN_SETS]
        data = None
        if not any(pending(u) for u in uris):
            data = describe_train_data(uris, load_hierarchy(cfg.hierarchy.name), cfg.data.weights, options)
        if evaluates:
            check_probe_sets([u for u in eval_set_uris(cfg) if not pending(u)], eval_split or cfg.eval.split, options,
                             (cfg.hierarchy.name,))
        w = cfg.model.init_weights
        if w and not resuming and not storage.exists(w, options):
            raise storage.StorageError(f"model.init_weights: no file at {w}")
    return data
