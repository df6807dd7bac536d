"""Session-wide services: one local Ray cluster, one real S3 server (SeaweedFS), one synthetic suite."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# The probes' scikit-learn fits share the 2 cores with the session's Ray workers: two OpenBLAS threads
# then spin against them (the end-to-end evaluation test: 155 s against 94 s with one thread).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]


def capture_log(lines: list) -> logging.Handler:
    """Append what the ``hierdino`` logger says to ``lines`` as the console prints it (``[hierdino] ...``)."""
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(f"[hierdino] {record.getMessage()}")
    logger = logging.getLogger("hierdino")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


@pytest.fixture
def said():
    """The ``hierdino`` logger's lines during the test."""
    lines: list[str] = []
    handler = capture_log(lines)
    yield lines
    logging.getLogger("hierdino").removeHandler(handler)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, log_to_driver=True, configure_logging=False,
                 runtime_env={"env_vars": {"AWS_EC2_METADATA_DISABLED": "true"}})
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    from hierdino.testing.s3server import start_s3_server

    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def synth_suite(tmp_path_factory):
    """The small synthetic suite at 64 px, built once per session."""
    from hierdino.data.suite import build_suite

    out = tmp_path_factory.mktemp("synth")
    build_suite(str(out), "small", 64, seed=0, workers=2)
    return str(out)


# Markers (pyproject.toml): `ray`, `s3` and `slow` follow from the fixtures a test uses; `SLOW` names the
# tests that take seconds without them (measured on 2 cores). `python -m pytest -m "not slow"` is the fast
# subset; `gpu` tests skip without CUDA.
FIXTURE_MARKS = {"ray_cluster": ("ray", "slow"), "s3_server": ("s3", "slow"), "synth_suite": ("slow",)}
SLOW = {  # each over 3 s on the 2-core machine without Ray, S3 or the suite fixtures (2026-12-07)
    "test_seeded_tiny_run_learns_without_collapse", "test_ranks_asked_to_stop_at_different_steps_read_the_same_votes",
    "test_train_compile_compiles_the_whole_step_once_for_20_steps_of_changing_batches",
    "test_pretrain_refuses_unusable_inputs_before_ray_starts", "test_oversubscribed_default_run_exits_fast_instead_of_hanging",
    "test_pretrain_validate_only_catches_bad_key", "test_mde_is_the_power_formula_on_a_hand_case",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        marks = {m for f in getattr(item, "fixturenames", ()) for m in FIXTURE_MARKS.get(f, ())}
        if item.originalname in SLOW or item.name in SLOW:
            marks.add("slow")
        for m in sorted(marks):
            item.add_marker(getattr(pytest.mark, m))
