"""Ray start-up in one place: join the cluster of ``RAY_ADDRESS`` or start a local one (apart from
another job's on the same machine), and keep Ray's own output to what a user needs (``--verbose``
brings the rest back)."""

from __future__ import annotations

import logging
import os
import socket
import warnings

from hierdino.logs import LEVEL_ENV

logger = logging.getLogger(__name__)


def quiet_ray_data(verbose: bool = False) -> None:
    """No Ray Data execution plans or progress bars in this process unless ``verbose`` (a Tune trial
    builds its datasets in its own process, so the trainer calls this too)."""
    from ray.data import DataContext  # heavy: the CLIs import this module at start-up, before they need Ray

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    if not verbose:  # after the import, which sets the 'ray.data' logger to INFO: no "execution finished" lines
        logging.getLogger("ray.data").setLevel(logging.ERROR)


def quiet_train_reports() -> None:
    """In a worker started by a quiet ``init_ray``: Ray Train's echo of every reported metric off (the
    progress line says it)."""
    if os.environ.get("HIERDINO_QUIET"):
        from ray.train.v2._internal.execution import (
            context as train_context,  # heavy: only Ray Train workers need it
        )

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _beside_another_instance(dashboard: bool) -> tuple[dict, dict]:
    """When another local Ray instance runs on this machine (another job's, started the same way): the
    ``ray.init`` arguments and worker environment that keep this job's cluster apart from it. Ray's
    state API, which Ray Train's placement-group cleaner and Ray Data query, finds "the" local
    cluster by looking for running instances, and with two it fails (``ConnectionError``: multiple
    active Ray instances); it is pointed at this cluster's own dashboard instead, on a port chosen
    here. Joining the other instance is no way out: it ends with the job that started it."""
    from ray._private.services import find_gcs_addresses  # heavy: Ray, loaded only to start a cluster

    others = sorted(find_gcs_addresses())
    if not others:
        return {}, {}
    said = (f"another Ray instance runs on this machine ({', '.join(others)}): this job starts its own "
            "beside it, sharing the machine's CPUs (--local-cpus splits them)")
    if not dashboard:
        logger.warning(f"{said}; without its dashboard, Ray Train's placement-group cleaner cannot tell the "
                       "two apart and says so")
        return {}, {}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    logger.warning(f"{said}, its dashboard at {url} (RAY_ADDRESS=<one of those addresses> runs it there instead)")
    os.environ["RAY_API_SERVER_ADDRESS"] = url  # this process's state API (the driver's Ray Data)
    return {"dashboard_host": "127.0.0.1", "dashboard_port": port}, {"RAY_API_SERVER_ADDRESS": url}


def init_ray(num_cpus: int | None = None, dashboard: bool = True, verbose: bool = False) -> None:
    """Join the cluster of ``RAY_ADDRESS`` (``ray job submit``), else start a local one (``num_cpus``:
    all by default), apart from any other local instance on the machine (``_beside_another_instance``).
    The local cluster keeps Ray's dashboard: Ray Train 2.60's placement-group cleaner and Tune's early
    stopping query its state API (without it the cleaner logs a failure every few seconds and a trial
    ASHA stops can keep its resources, ray-project/ray #54305). The workers log at this process's
    ``hierdino`` level (``HIERDINO_LOG_LEVEL``, set by ``hierdino.logs.console``).

    Unless ``verbose``: one progress line per log step (Ray Train's print patch tees worker prints
    into its logger, so each line came twice), no Ray Data execution plans or progress bars, Ray Data
    logs at ERROR (local clusters), no deprecation warnings from Ray's internals; locally, no preemption watcher.
    """
    import ray  # heavy: the CLIs import this module at start-up, before they need Ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # propagated by Ray Train to its workers
    level = os.environ.get(LEVEL_ENV)
    env = {LEVEL_ENV: level} if level else {}
    if not verbose:
        from ray.util.annotations import RayDeprecationWarning  # heavy: Ray, loaded only to start a cluster

        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
        env["RAY_DATA_LOG_LEVEL"] = "ERROR"  # its warnings are progress-bar notes; preflight covers resources
        env["HIERDINO_QUIET"] = "1"  # workers: no per-report echo of every metric (quiet_train_reports)
    # Test-only faults (HIERDINO_TEST_*) reach the workers, with their installer (hierdino.testing.faults).
    faults = {k: v for k, v in os.environ.items() if k.startswith("HIERDINO_TEST_")}
    env.update(faults)
    if os.environ.get("RAY_ADDRESS"):  # a submitted job keeps its own runtime_env unless a test injects faults
        extra = dict(faults, **({LEVEL_ENV: level} if level and level != "INFO" else {}))  # or a chosen level
        ray.init(runtime_env=_runtime_env(extra, faults))
    else:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")  # a laptop is not preempted
        apart, apart_env = _beside_another_instance(dashboard)
        env.update(apart_env)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, configure_logging=False,
                 runtime_env=_runtime_env(env, faults), **apart)
    quiet_ray_data(verbose)


def _runtime_env(env_vars: dict, faults: dict) -> dict | None:
    """The job's ``runtime_env``: ``env_vars`` and, when a test asks for faults, the hook that installs them
    in every worker process (a name: the library never imports the test code)."""
    if not env_vars:
        return None
    return dict(env_vars=env_vars, **({"worker_process_setup_hook": "hierdino.testing.faults.install"} if faults else {}))
