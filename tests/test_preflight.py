"""Preflight (issue #14): a run that cannot fit the cluster stops at once with the numbers and the fix."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from hierdino.config import load_config
from hierdino.train.preflight import ResourcesError, plan_resources, preflight


def _cfg(*over):
    return load_config("tiny-cpu", list(over))


def test_two_one_cpu_workers_on_two_cpus_is_refused_with_the_fix():
    with pytest.raises(ResourcesError, match=r"2 free CPU.*2 training worker.*leave 0 on any one node.*num_cpus_per_map=0.5.*cpus_per_worker=0.75"):
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


def test_waits_for_an_autoscaling_cluster_with_messages_then_gives_up(said):
    now = [0.0]
    grows = iter([{"CPU": 1.0}] * 3 + [{"CPU": 4.0}])
    cfg = _cfg("scaling.num_workers=2", "scaling.wait_for_resources_s=60")
    asked = []
    plan = preflight(cfg, resources=lambda: next(grows), sleep=lambda s: now.__setitem__(0, now[0] + s),
                     clock=lambda: now[0], request=asked.append)
    assert plan.workers == 2 and now[0] == 15.0 and len(said) == 1 and "waiting up to 60 s" in said[0]
    # the autoscaler is asked once for the run's bundles: two workers and one ingest task
    w, m = cfg.scaling.cpus_per_worker, cfg.data.num_cpus_per_map
    assert asked == [[{"CPU": w}, {"CPU": w}, {"CPU": m}], []]  # and withdrawn once it fits
    now[0] = 0.0
    asked.clear()
    with pytest.raises(ResourcesError, match=r"waited 60 s"):
        preflight(cfg, resources=lambda: {"CPU": 1.0}, sleep=lambda s: now.__setitem__(0, now[0] + s),
                  clock=lambda: now[0], request=asked.append)
    assert asked == [[{"CPU": w}, {"CPU": w}, {"CPU": m}], []]  # withdrawn when the wait gives up too
    assert len(said) == 1 + 2  # one line per 30 s of waiting, not one per poll


def test_oversubscribed_default_run_exits_fast_instead_of_hanging(tmp_path):
    """As a user runs it on a 2-CPU machine: `pretrain.py --set scaling.num_workers=2` (a fresh local Ray).
    "Fast" is an event, not a clock: the preflight refuses on its first look at the cluster (no wait
    announced, and the error's own "(waited N s)" says 0 s) and before any data is built. The
    subprocess timeout only guards against a hang."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "jobs/pretrain.py", "--local-cpus", "2", "--set", "scaling.num_workers=2",
                          "--set", f"run.storage={tmp_path}", "--set", "data.synth_cache=" + str(tmp_path / "synth")],
                         cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "resources error" in out.stderr and "cpus_per_worker=0.75" in out.stderr
    # refused at once: no wait announced, and the preflight's own count of the time it waited is 0 s
    # (each retry sleeps 5 s, so any wait reads "(waited 5 s)" or more)
    assert "waiting up to" not in out.stdout + out.stderr
    assert re.search(r"\(waited 0 s\)\s*$", out.stderr.strip()) or "(waited" not in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "synth").exists()  # stopped before building any data


def test_fractional_gpus_pack_several_trials_on_one_gpu():
    from hierdino.train.preflight import trials_at_once

    quarter = _cfg("scaling.use_gpu=true", "scaling.gpus_per_worker=0.25", "scaling.cpus_per_worker=2",
                   "data.num_cpus_per_map=1")
    assert plan_resources(quarter, {"CPU": 16.0, "GPU": 1.0}).gpus == 0.25
    assert trials_at_once(quarter, {"CPU": 16.0, "GPU": 1.0}) == 4   # 4 x 0.25 GPU; CPUs would allow 5
    assert trials_at_once(quarter, {"CPU": 8.0, "GPU": 1.0}) == 2    # 8 // (2 + 1) CPUs
    assert trials_at_once(_cfg(), {"CPU": 2.0}) == 1                 # the tiny preset: 1 + 0.5 CPUs each
    fifth = _cfg("scaling.use_gpu=true", "scaling.gpus_per_worker=0.2", "scaling.cpus_per_worker=0.2", "data.num_cpus_per_map=0.4")
    assert trials_at_once(fifth, {"CPU": 3.0, "GPU": 1.0}) == 5      # 3 / 0.6 and 1 / 0.2, not 3 // 0.6 == 4
    five = _cfg("scaling.cpus_per_worker=5", "data.num_cpus_per_map=0.25")  # 16 / 5.25 CPUs is 3 on the totals,
    assert trials_at_once(five, [{"CPU": 8.0}, {"CPU": 8.0}]) == 2   # but each 8-CPU node holds one 5-CPU worker
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
    check_nodes_see([str(present), f"file://{present}", "s3://bucket/data/manifest.json"], min_nodes=1)
    node = ray_cluster.nodes()[0]["NodeManagerAddress"]
    with pytest.raises(StorageError, match=rf"node {node} lacks {tmp_path}/gone/manifest.json\. Put the datasets"):
        check_nodes_see([str(present), str(tmp_path / "gone" / "manifest.json")], min_nodes=1)
    check_nodes_see([str(tmp_path / "gone" / "manifest.json")])  # one node: nothing to compare, no probe


def test_workers_are_placed_node_by_node_and_the_ingest_needs_room_on_one_node():
    """Totals are not enough: two 2-CPU nodes hold two workers of 1.75 CPUs (3.5 + 0.5 <= 4) only with
    0.25 CPU left on each, so the ingest share is lowered to what one node has; a worker bigger than
    any node is refused (Ray would wait for such a node forever); STRICT_SPREAD needs a node per worker."""
    two = [{"CPU": 2.0}, {"CPU": 2.0}]
    plan = plan_resources(_cfg("scaling.num_workers=2", "scaling.cpus_per_worker=1.75"), two)
    assert plan.ingest_cpus == 0.25 and "lowered from 0.5 to 0.25" in plan.note and "roomiest node" in plan.note
    with pytest.raises(ResourcesError, match=r"do not fit on the nodes .*PACK.*free per node: 2 CPU, 2 CPU"):
        plan_resources(_cfg("scaling.cpus_per_worker=3"), two)
    assert plan_resources(_cfg("scaling.num_workers=2", "scaling.cpus_per_worker=1"), two).ingest_cpus == 0.5  # packed: 0 + 2 left
    with pytest.raises(ResourcesError, match="STRICT_SPREAD"):
        plan_resources(_cfg("scaling.num_workers=4", "scaling.cpus_per_worker=0.25", "scaling.placement_strategy=STRICT_SPREAD"), two)
    # a share that would round to nothing is refused, not lowered to 0 CPUs (no concurrency limit at all)
    with pytest.raises(ResourcesError, match="leave 0.0001 on any one node"):
        plan_resources(_cfg("scaling.cpus_per_worker=1.9999"), {"CPU": 2.0})


def test_a_busy_cluster_is_waited_for_briefly_then_refused_and_fixes_that_fail_are_not_offered(said):
    """Another job holds 1.5 of 2 CPUs: the run would fit the node, not what is free. It waits
    BUSY_GRACE_S (a job that is ending frees them), saying so, then stops instead of starting a run
    whose ingest never gets a CPU. On 1 CPU with 4 workers no cpus_per_worker fits: none is suggested."""
    from hierdino.train.preflight import BUSY_GRACE_S

    now, asked = [0.0], []
    with pytest.raises(ResourcesError, match=r"other work holds the rest\) \(waited 30 s\)"):
        preflight(_cfg(), resources=lambda: [{"CPU": 0.5}], totals=lambda: [{"CPU": 2.0}],
                  sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0], request=asked.append)
    assert now[0] == BUSY_GRACE_S == 30 and "waiting up to 30 s more" in said[0] and asked == []  # no nodes asked for
    # busy enough only to lower the ingest's share (0.4 CPU left beside the worker): also waited for first
    now[0] = 0.0
    said.clear()
    freed = iter([[{"CPU": 1.4}], [{"CPU": 2.0}]])
    assert preflight(_cfg(), resources=lambda: next(freed), totals=lambda: [{"CPU": 2.0}],
                     sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0]).ingest_cpus == 0.5
    assert now[0] == 5.0 and "other work holds now" in said[0]
    freed = iter([[{"CPU": 0.5}], [{"CPU": 2.0}]])
    assert preflight(_cfg(), resources=lambda: next(freed), totals=lambda: [{"CPU": 2.0}],
                     sleep=lambda s: None, clock=lambda: 0.0).ingest_cpus == 0.5
    with pytest.raises(ResourcesError) as e:
        plan_resources(_cfg("scaling.num_workers=4", "scaling.cpus_per_worker=0.25"), {"CPU": 1.0})
    assert "cpus_per_worker=" not in str(e.value).split("Fix:")[1] and "Fix: fewer workers" in str(e.value)
