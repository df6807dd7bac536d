"""Preflight (issue #14): a run that cannot fit the cluster stops at once with the numbers and the fix."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from hierdino.config import load_config
from hierdino.train.preflight import ResourcesError, plan_resources, preflight

from conftest import REPO


def _cfg(*over):
    return load_config("tiny-cpu", list(over))


def test_two_one_cpu_workers_on_two_cpus_is_refused_with_the_fix():
    with pytest.raises(ResourcesError, match=r"2 CPU.*2 training worker.*leave 0 .*num_cpus_per_map=0.5.*cpus_per_worker=0.75"):
        plan_resources(_cfg("scaling.num_workers=2"), {"CPU": 2.0})


def test_ingest_share_adapts_to_what_is_left_and_says_so():
    plan = plan_resources(_cfg("scaling.num_workers=2", "scaling.cpus_per_worker=0.8", "data.num_cpus_per_map=1"), {"CPU": 2.0})
    assert plan.ingest_cpus == pytest.approx(0.4) and "lowered from 1 to 0.4" in plan.note
    plan = plan_resources(_cfg(), {"CPU": 2.0})  # the embedded default: 1 worker x 1 CPU + 0.5 for the ingest
    assert plan.ingest_cpus == 0.5 and plan.note == ""


def test_gpus_asked_of_a_cpu_cluster_are_refused():
    with pytest.raises(ResourcesError, match="use_gpu=true.*needs 2 GPU.*has 0"):
        plan_resources(_cfg("scaling.use_gpu=true", "scaling.num_workers=2"), {"CPU": 64.0})
    assert plan_resources(_cfg("scaling.use_gpu=true", "scaling.num_workers=2"), {"CPU": 8.0, "GPU": 2.0}).gpus == 2


def test_waits_for_an_autoscaling_cluster_with_messages_then_gives_up():
    now = [0.0]
    said = []
    grows = iter([{"CPU": 1.0}] * 3 + [{"CPU": 4.0}])
    cfg = _cfg("scaling.num_workers=2", "scaling.wait_for_resources_s=60")
    asked = []
    plan = preflight(cfg, said.append, resources=lambda: next(grows), sleep=lambda s: now.__setitem__(0, now[0] + s),
                     clock=lambda: now[0], request=asked.append)
    assert plan.workers == 2 and now[0] == 15.0 and len(said) == 1 and "waiting up to 60 s" in said[0]
    # the autoscaler is asked once for the run's bundles: two workers and one ingest task
    w, m = cfg.scaling.cpus_per_worker, cfg.data.num_cpus_per_map
    assert asked == [[{"CPU": w}, {"CPU": w}, {"CPU": m}], []]  # and withdrawn once it fits
    now[0] = 0.0
    asked.clear()
    with pytest.raises(ResourcesError, match=r"waited 60 s"):
        preflight(cfg, said.append, resources=lambda: {"CPU": 1.0}, sleep=lambda s: now.__setitem__(0, now[0] + s),
                  clock=lambda: now[0], request=asked.append)
    assert asked == [[{"CPU": w}, {"CPU": w}, {"CPU": m}], []]  # withdrawn when the wait gives up too
    assert len(said) == 1 + 2  # one line per 30 s of waiting, not one per poll


def test_oversubscribed_default_run_exits_fast_instead_of_hanging(tmp_path):
    """As a user runs it on a 2-CPU machine: `pretrain.py --set scaling.num_workers=2` (a fresh local Ray)."""
    t0 = time.time()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "jobs/pretrain.py", "--local-cpus", "2", "--set", "scaling.num_workers=2",
                          "--set", f"run.storage={tmp_path}", "--set", "data.synth_cache=" + str(tmp_path / "synth")],
                         cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "resources error" in out.stderr and "cpus_per_worker=0.75" in out.stderr
    assert time.time() - t0 < 60
    assert not (tmp_path / "synth").exists()  # stopped before building any data


def test_fractional_gpus_pack_several_trials_on_one_gpu():
    from hierdino.train.preflight import trials_at_once

    quarter = _cfg("scaling.use_gpu=true", "scaling.gpus_per_worker=0.25", "scaling.cpus_per_worker=2",
                   "data.num_cpus_per_map=1")
    assert plan_resources(quarter, {"CPU": 16.0, "GPU": 1.0}).gpus == 0.25
    assert trials_at_once(quarter, {"CPU": 16.0, "GPU": 1.0}) == 4   # 4 x 0.25 GPU; CPUs would allow 5
    assert trials_at_once(quarter, {"CPU": 8.0, "GPU": 1.0}) == 2    # 8 // (2 + 1) CPUs
    assert trials_at_once(_cfg(), {"CPU": 2.0}) == 1                 # the tiny preset: 1 + 0.5 CPUs each
    with pytest.raises(ResourcesError, match="gpus_per_worker=1 needs 2 GPU"):
        plan_resources(_cfg("scaling.use_gpu=true", "scaling.num_workers=2"), {"CPU": 16.0, "GPU": 1.0})


def test_local_paths_missing_on_a_node_are_named_before_any_worker_starts(ray_cluster, tmp_path):
    """The per-node probe (run on every node with CPUs; here the session cluster's one node, asked for
    with min_nodes=1): a path the node lacks is named with the node's address; present paths and S3
    URIs pass."""
    from hierdino.storage import StorageError
    from hierdino.train.preflight import check_nodes_see

    present = tmp_path / "manifest.json"
    present.write_text("{}")
    check_nodes_see([str(present), "s3://bucket/data/manifest.json"], min_nodes=1)
    node = ray_cluster.nodes()[0]["NodeManagerAddress"]
    with pytest.raises(StorageError, match=rf"node {node} lacks {tmp_path}/gone/manifest.json\. Put the datasets"):
        check_nodes_see([str(present), str(tmp_path / "gone" / "manifest.json")], min_nodes=1)
    check_nodes_see([str(tmp_path / "gone" / "manifest.json")])  # one node: nothing to compare, no probe
