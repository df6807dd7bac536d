"""Preflight: does the cluster have what a run asks for? Checked before any trainer starts.

A run needs ``num_workers x cpus_per_worker`` CPUs (and one GPU per worker with ``use_gpu``) for
the training workers, plus at least one Ray Data task's CPUs (``data.num_cpus_per_map``) beside
them, or the ingest never runs and the workers wait forever for their first batch. When the CPUs
left beside the workers are fewer than ``num_cpus_per_map`` but more than none, the ingest's share is
lowered to what is left (and said). Otherwise the run stops with one error naming the numbers and
the fixes. A cluster that grows on demand (KubeRay or ``ray up`` autoscaling) can be waited for:
``scaling.wait_for_resources_s`` polls the cluster, printing what it waits for, then gives up.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from hierdino import storage


class ResourcesError(RuntimeError):
    """The cluster cannot run this configuration; the message names the numbers and the fix."""


@dataclass
class Plan:
    """What a run asks for and the ingest CPU share it will use."""

    workers: int
    cpus_per_worker: float
    gpus: float
    ingest_cpus: float          # num_cpus_per_map after adaptation
    note: str = ""              # what was adapted, for the start block


def plan_resources(cfg, available: dict) -> Plan:
    """Fit ``cfg`` to the cluster's total resources ``available`` (``ray.cluster_resources()``)."""
    s = cfg.scaling
    cpus, gpus = float(available.get("CPU", 0)), float(available.get("GPU", 0))
    train_cpus = s.num_workers * s.cpus_per_worker
    want_gpus = s.num_workers * s.gpus_per_worker if s.use_gpu else 0
    if want_gpus > gpus + 1e-9:
        raise ResourcesError(
            f"scaling.use_gpu=true with scaling.num_workers={s.num_workers} x scaling.gpus_per_worker="
            f"{s.gpus_per_worker:g} needs {want_gpus:g} GPU(s); the cluster has "
            f"{gpus:g}. Set scaling.use_gpu=false to train on CPUs, lower scaling.num_workers, or add GPU nodes "
            "(an autoscaling cluster: set scaling.wait_for_resources_s)")
    spare = cpus - train_cpus
    need = cfg.data.num_cpus_per_map
    if spare >= need:
        return Plan(s.num_workers, s.cpus_per_worker, want_gpus, need)
    if spare > 0:
        return Plan(s.num_workers, s.cpus_per_worker, want_gpus, round(spare, 3),
                    f"data.num_cpus_per_map lowered from {need:g} to {spare:g}: the CPUs left beside "
                    f"{s.num_workers} worker(s) x {s.cpus_per_worker:g} CPU")
    fits = max(cpus - need, 0) / s.num_workers
    raise ResourcesError(
        f"the cluster has {cpus:g} CPU(s); {s.num_workers} training worker(s) x scaling.cpus_per_worker="
        f"{s.cpus_per_worker:g} take {train_cpus:g} and leave {max(spare, 0):g} for the data ingest, which needs "
        f"data.num_cpus_per_map={need:g} at least: the run would wait forever for its first batch. Fix: "
        + (f"--set scaling.cpus_per_worker={_floor(fits)} " if fits > 0 else "")
        + "or fewer workers (scaling.num_workers), or a smaller data.num_cpus_per_map, or a bigger cluster "
        "(an autoscaling cluster: set scaling.wait_for_resources_s)")


def _floor(x: float) -> str:
    """A round CPU count <= x (0.25 steps below 1)."""
    return f"{int(x)}" if x >= 1 else f"{max(int(x * 4) / 4, 0.25):g}"


def demand(cfg) -> list[dict]:
    """The run's resource bundles: one per training worker, and one ingest task's CPUs."""
    worker = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": cfg.scaling.gpus_per_worker} if cfg.scaling.use_gpu else {})}
    return [dict(worker) for _ in range(cfg.scaling.num_workers)] + [{"CPU": cfg.data.num_cpus_per_map}]


def preflight(cfg, log=print, resources=None, sleep=time.sleep, clock=time.monotonic, request=None) -> Plan:
    """``plan_resources`` against the live cluster; with ``scaling.wait_for_resources_s`` > 0, retry
    until it fits or the time is up (a message every 30 s, never a silent wait). While it waits it
    asks the autoscaler for the run's bundles (``request``: Ray's ``request_resources`` on the live
    cluster), since polling alone adds no node to a cluster that scales up from zero workers."""
    if resources is None:
        import ray  # heavy: only a check against the live cluster needs Ray
        from ray.autoscaler.sdk import request_resources  # likewise

        resources = ray.cluster_resources
        request = request or (lambda bundles: request_resources(bundles=bundles))
    deadline = clock() + cfg.scaling.wait_for_resources_s
    last_said, requested = None, False
    try:
        while True:
            try:
                plan = plan_resources(cfg, resources())
            except ResourcesError as e:
                now = clock()
                if now >= deadline:
                    waited = cfg.scaling.wait_for_resources_s
                    raise ResourcesError(str(e) + (f" (waited {waited:g} s)" if waited else "")) from None
                if request is not None and not requested:
                    request(demand(cfg))
                    requested = True
                if last_said is None or now - last_said >= 30:
                    log(f"[hierdino] waiting up to {deadline - now:.0f} s more for resources: {e}")
                    last_said = now
                sleep(min(5.0, max(deadline - now, 0.0)))
                continue
            if plan.note:
                log(f"[hierdino] {plan.note}")
            return plan
    finally:
        if requested:  # withdrawn once the nodes are there (the trainer then holds them) or the wait ends:
            request([])  # a standing request would keep the nodes up after the run


def trials_at_once(cfg, available: dict) -> int:
    """How many runs of ``cfg`` (sweep trials) fit on the cluster together: each takes its workers'
    CPUs and GPU shares plus one ingest task's CPUs."""
    s = cfg.scaling
    per_cpu = s.num_workers * s.cpus_per_worker + cfg.data.num_cpus_per_map
    fit = int(float(available.get("CPU", 0)) // per_cpu)
    if s.use_gpu:
        fit = min(fit, int(float(available.get("GPU", 0)) // (s.num_workers * s.gpus_per_worker) + 1e-9))
    return fit


def _missing(paths: list[str]) -> list[str]:
    return [p for p in paths if not os.path.exists(p)]


def check_nodes_see(paths: list[str], min_nodes: int = 2, timeout_s: float = 60.0) -> None:
    """Local paths a run reads or writes on every node (its training datasets' manifests, which Ray
    Data read tasks open on any node; the run directory's ``config.yaml``, beside which each worker
    writes its checkpoint shards; the external sets of a live evaluation, read by every worker):
    on a cluster of ``min_nodes`` or more nodes with CPUs, one zero-CPU task per node looks for
    each. A path missing on a node raises ``StorageError`` naming both, before any worker starts
    (otherwise a read task or a worker fails minutes into the run). Nodes that join later (an
    autoscaling cluster) are not seen here; the workers check the run directory again."""
    local = [p for p in paths if not storage.is_s3(p)]
    if not local:
        return
    import ray  # heavy: only a check against the live cluster needs Ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # likewise

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if len(nodes) < min_nodes:
        return
    probe = ray.remote(num_cpus=0, max_retries=0)(_missing)
    refs = {n["NodeManagerAddress"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(local)
            for n in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    missing = {node: ray.get(ref) for node, ref in refs.items() if ref in ready}
    missing = {node: paths for node, paths in missing.items() if paths}
    if missing:
        lines = "; ".join(f"node {node} lacks {', '.join(paths)}" for node, paths in sorted(missing.items()))
        raise storage.StorageError(
            f"local paths this run reads or writes are not on every node of the cluster ({len(nodes)} nodes with CPUs): "
            f"{lines}. Put the datasets and run.storage on s3:// URIs, or on a filesystem shared by every node and "
            "mounted at the same path")
