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

import logging
import os
import time
from dataclasses import dataclass

from hierdino import storage
from hierdino.errors import UserError

logger = logging.getLogger(__name__)


class ResourcesError(UserError, RuntimeError):
    """The cluster cannot run this configuration; the message names the numbers and the fix."""

    kind = "resources"


@dataclass
class ResourcePlan:
    """What a run asks for and the ingest CPU share it will use."""

    workers: int
    cpus_per_worker: float
    gpus: float
    ingest_cpus: float          # num_cpus_per_map after adaptation
    note: str = ""              # what was adapted, for the start block


MIN_INGEST_CPUS = 0.05  # below this share an ingest task is not worth lowering to: the run is refused


def _nodes(resources: dict | list[dict]) -> list[dict]:
    return [resources] if isinstance(resources, dict) else list(resources)


def place_workers(cfg, nodes: list[dict]) -> list[dict] | None:
    """What each node has left (``{"CPU", "GPU"}``) once the training workers are placed on ``nodes``
    (each a dict of its free resources) as Ray's placement group would: PACK fills the node with the
    least room that fits (best fit), SPREAD the one with the most, STRICT_PACK needs one node for all,
    STRICT_SPREAD one node each. ``None`` when some worker fits on no node."""
    s = cfg.scaling
    cpu, gpu = s.cpus_per_worker, (s.gpus_per_worker if s.use_gpu else 0.0)
    free = [[float(n.get("CPU", 0)), float(n.get("GPU", 0))] for n in nodes]
    if s.placement_strategy == "STRICT_PACK":
        fits = [i for i, (c, g) in enumerate(free) if c + 1e-9 >= cpu * s.num_workers and g + 1e-9 >= gpu * s.num_workers]
        if not fits:
            return None
        i = min(fits, key=lambda i: free[i][0])
        free[i][0] -= cpu * s.num_workers
        free[i][1] -= gpu * s.num_workers
    else:
        used: set[int] = set()
        for _ in range(s.num_workers):
            fits = [i for i, (c, g) in enumerate(free) if c + 1e-9 >= cpu and g + 1e-9 >= gpu
                    and not (s.placement_strategy == "STRICT_SPREAD" and i in used)]
            if not fits:
                return None
            i = (min if s.placement_strategy == "PACK" else max)(fits, key=lambda i: free[i][0])
            free[i][0] -= cpu
            free[i][1] -= gpu
            used.add(i)
    return [{"CPU": max(c, 0.0), "GPU": max(g, 0.0)} for c, g in free]


def plan_resources(cfg, resources: dict | list[dict]) -> ResourcePlan:
    """Fit ``cfg`` to the cluster: ``resources`` is each node's free resources (a list) or one dict
    for a single node (``ray.cluster_resources()`` of a one-node cluster). The workers must fit on
    the nodes as placed by ``place_workers``, and one node must keep an ingest task's CPUs beside
    them (Ray Data's tasks each run on one node)."""
    s = cfg.scaling
    nodes = _nodes(resources)
    cpus, gpus = (sum(float(n.get(k, 0)) for n in nodes) for k in ("CPU", "GPU"))
    train_cpus = s.num_workers * s.cpus_per_worker
    want_gpus = s.num_workers * s.gpus_per_worker if s.use_gpu else 0
    where = f"{len(nodes)} nodes with " if len(nodes) > 1 else ""
    if want_gpus > gpus + 1e-9:
        raise ResourcesError(
            f"scaling.use_gpu=true with scaling.num_workers={s.num_workers} x scaling.gpus_per_worker="
            f"{s.gpus_per_worker:g} needs {want_gpus:g} GPU(s); the cluster has "
            f"{where}{gpus:g} free. Set scaling.use_gpu=false to train on CPUs, lower scaling.num_workers, or add GPU nodes "
            "(an autoscaling cluster: set scaling.wait_for_resources_s)")
    need = cfg.data.num_cpus_per_map
    left = place_workers(cfg, nodes) if train_cpus <= cpus + 1e-9 else None
    if left is None and train_cpus <= cpus + 1e-9:  # enough in all, but no node (or not the ones the strategy needs) has room
        per_node = ", ".join(f"{float(n.get('CPU', 0)):g} CPU" + (f" + {float(n.get('GPU', 0)):g} GPU" if s.use_gpu else "")
                             for n in nodes)
        raise ResourcesError(
            f"{s.num_workers} training worker(s) of scaling.cpus_per_worker={s.cpus_per_worker:g}"
            + (f" + scaling.gpus_per_worker={s.gpus_per_worker:g}" if s.use_gpu else "")
            + f" do not fit on the nodes with scaling.placement_strategy={s.placement_strategy} (free per node: {per_node}). "
            "Fix: a smaller scaling.cpus_per_worker, fewer workers, another placement strategy, or bigger nodes")
    spare = max(n["CPU"] for n in left) if left else 0.0
    if left is not None and spare + 1e-9 >= need:
        return ResourcePlan(s.num_workers, s.cpus_per_worker, want_gpus, need)
    if left is not None and spare >= MIN_INGEST_CPUS:
        lowered = int(spare * 100 + 1e-6) / 100  # down to a hundredth, never to 0
        return ResourcePlan(s.num_workers, s.cpus_per_worker, want_gpus, lowered,
                    f"data.num_cpus_per_map lowered from {need:g} to {lowered:g}: the CPUs left beside "
                    f"{s.num_workers} worker(s) x {s.cpus_per_worker:g} CPU" + (" on the roomiest node" if len(nodes) > 1 else ""))
    fits = (cpus - need) / s.num_workers
    fix = f"--set scaling.cpus_per_worker={_floor(fits)}, " if _floor(fits) and len(nodes) == 1 else ""
    raise ResourcesError(
        f"the cluster has {where}{cpus:g} free CPU(s); {s.num_workers} training worker(s) x scaling.cpus_per_worker="
        f"{s.cpus_per_worker:g} leave {spare:g} on any one node for the data ingest (data.num_cpus_per_map={need:g}): "
        "no batch would ever come. Fix: " + fix + "fewer workers, a smaller data.num_cpus_per_map, or a bigger "
        "cluster (autoscaling: scaling.wait_for_resources_s)")


def _floor(x: float) -> str | None:
    """A round CPU count <= x (0.25 steps below 1); None below 0.25."""
    if x < 0.25:
        return None
    return f"{int(x)}" if x >= 1 else f"{int(x * 4) / 4:g}"


def demand(cfg) -> list[dict]:
    """The run's resource bundles: one per training worker, and one ingest task's CPUs."""
    worker = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": cfg.scaling.gpus_per_worker} if cfg.scaling.use_gpu else {})}
    return [dict(worker) for _ in range(cfg.scaling.num_workers)] + [{"CPU": cfg.data.num_cpus_per_map}]


BUSY_GRACE_S = 30.0  # how long a cluster whose nodes would fit the run, but are busy now, is waited for


def preflight(cfg, resources=None, sleep=time.sleep, clock=time.monotonic, request=None,
              totals=None, free: bool = True, note: bool = True) -> ResourcePlan:
    """``plan_resources`` against the live cluster's free resources per node (``free=False``: their
    totals, for a sweep trial, whose fellow trials hold the rest by design); with
    ``scaling.wait_for_resources_s`` > 0, retry until it fits or the time is up (a message every 30 s,
    never a silent wait). A cluster whose nodes would fit the run but are busy now (another job holds
    CPUs: it would starve this run's ingest) is waited for ``BUSY_GRACE_S`` at least. While it waits it
    asks the autoscaler for the run's bundles (``request``: Ray's ``request_resources`` on the live
    cluster), since polling alone adds no node to a cluster that scales up from zero workers. The waits
    are warnings (said under ``--quiet`` too); the plan's note is said unless ``note`` is false (a
    caller that plans again later says it then)."""
    if resources is None:
        # heavy: only a check against the live cluster needs Ray
        from ray._private.state import available_resources_per_node, total_resources_per_node
        from ray.autoscaler.sdk import request_resources  # likewise

        per_node = available_resources_per_node if free else total_resources_per_node
        resources = lambda: list(per_node().values())  # noqa: E731
        totals = totals or (lambda: list(total_resources_per_node().values()))
        request = request or (lambda bundles: request_resources(bundles=bundles))
    start = clock()
    deadline = start + cfg.scaling.wait_for_resources_s
    last_said, requested = None, False
    try:
        while True:
            try:
                plan = plan_resources(cfg, resources())
            except ResourcesError as e:
                now = clock()
                busy = totals is not None and _ingest_share(cfg, totals()) > 0
                until = max(deadline, start + BUSY_GRACE_S) if busy else deadline
                if busy:
                    e = ResourcesError(f"{e} (free resources now: the cluster's nodes would fit the run, other work "
                                       "holds the rest)")
                if now >= until:
                    waited = now - start
                    raise ResourcesError(str(e) + (f" (waited {waited:.0f} s)" if waited else "")) from None
                if request is not None and not requested and (not busy or cfg.scaling.wait_for_resources_s > 0):
                    request(demand(cfg))
                    requested = True
                if last_said is None or now - last_said >= 30:
                    logger.warning(f"waiting up to {until - now:.0f} s more for resources: {e}")
                    last_said = now
                sleep(5.0)
                continue
            if plan.note and totals is not None and clock() < start + BUSY_GRACE_S and plan.ingest_cpus < _ingest_share(cfg, totals()):
                if last_said is None:  # the ingest's share is lowered only because other work holds CPUs now
                    logger.warning(f"waiting up to {start + BUSY_GRACE_S - clock():.0f} s for the data ingest's "
                                   f"{cfg.data.num_cpus_per_map:g} CPU(s), which other work holds now")
                    last_said = clock()
                sleep(5.0)
                continue
            if plan.note and note:
                logger.info(plan.note)
            return plan
    finally:
        if requested:  # withdrawn once the nodes are there (the trainer then holds them) or the wait ends:
            request([])  # a standing request would keep the nodes up after the run


def _ingest_share(cfg, nodes) -> float:
    """The ingest CPUs a run gets on ``nodes``; 0 when it does not fit them."""
    try:
        return plan_resources(cfg, nodes).ingest_cpus
    except ResourcesError:
        return 0.0


def trials_at_once(cfg, resources: dict | list[dict]) -> int:
    """How many runs of ``cfg`` (sweep trials) fit on the cluster together (``resources``: each node's,
    or one dict for one node): each trial's workers placed node by node as ``place_workers`` places
    them, and its ingest task's CPUs on the roomiest node left."""
    nodes, fit = [dict(n) for n in _nodes(resources)], 0
    while fit < 10_000:
        left = place_workers(cfg, nodes)
        if left is None:
            break
        roomiest = max(range(len(left)), key=lambda i: left[i]["CPU"])
        if left[roomiest]["CPU"] + 1e-9 < cfg.data.num_cpus_per_map:
            break
        left[roomiest]["CPU"] -= cfg.data.num_cpus_per_map
        nodes, fit = left, fit + 1
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
    local = [storage.resolve(p)[1] for p in paths if not storage.is_s3(p)]  # file://, ~ and relative paths as read
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
    missing = {node: lacks for node, ref in refs.items() if ref in ready and (lacks := ray.get(ref))}
    if missing:
        lines = "; ".join(f"node {node} lacks {', '.join(lacks)}" for node, lacks in sorted(missing.items()))
        raise storage.StorageError(
            f"local paths this run reads or writes are not on every node of the cluster ({len(nodes)} nodes with CPUs): "
            f"{lines}. Put the datasets and run.storage on s3:// URIs, or on a filesystem shared by every node and "
            "mounted at the same path")
