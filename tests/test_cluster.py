"""Cluster operations: strict manifest checks, a real `ray job submit`, and a two-node run."""

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from hierdino.manifests import BUNDLED_SCHEMAS, check_custom_resource, check_file, check_launcher, load_schemas

RAY_CLI = str(Path(sys.executable).parent / "ray")
SCHEMA_DIR = BUNDLED_SCHEMAS  # what users get: the schemas shipped in the package


def test_bundled_schemas_are_the_kuberay_v170_crd_schemas():
    shared = REPO.parent / "shared" / "kuberay-v1.7.0"  # the copy the project's schemas were taken from
    bundled = load_schemas()
    assert set(bundled) == {"RayJob", "RayCluster"}
    assert "submissionMode" in bundled["RayJob"]["properties"]["spec"]["properties"]
    if shared.is_dir():
        assert bundled == load_schemas(shared)
KUBERAY = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests_pass_strict_checks(path):
    assert check_file(path, load_schemas(SCHEMA_DIR)) == []


def _job():
    return yaml.safe_load((REPO / "cluster/kuberay/rayjob-pretrain.yaml").read_text())


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["spec"].__setitem__("shutdownAfterJobFinished", True), "'shutdownAfterJobFinished' was unexpected"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].__setitem__("imagee", "x"),
     "'imagee' was unexpected"),
    (lambda d: d["spec"].__setitem__("submissionMode", "K8sMode"), "submissionMode: 'K8sMode' is not one of"),
    (lambda d: d["spec"].__setitem__("shutdownAfterJobFinishes", False), "ttlSecondsAfterFinished is set but"),
    (lambda d: d["spec"].__setitem__("activeDeadlineSeconds", 0), "activeDeadlineSeconds: must be > 0"),
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("replicas", 9), "minReplicas <= replicas <= maxReplicas"),
    (lambda d: d["metadata"].__setitem__("name", "x" * 48), "must be <= 47"),
    (lambda d: d["spec"]["rayClusterSpec"].__setitem__("rayVersion", "2.59.0"), "pinned Ray 2.60.0"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__(
        "image", "rayproject/ray:2.50.0-py311-gpu"), "is not Ray 2.60.0"),
    (lambda d: d["spec"].__setitem__("runtimeEnvYAML", "working_dirr: s3://b/c.zip\n"), "unknown RuntimeEnv field"),
    (lambda d: d["spec"].__setitem__("entrypoint", "python jobs/pretrain.py --config vitl14 --set train.stpes=3"),
     "did you mean train.steps"),
    (lambda d: d["spec"].__setitem__("backoffLimit", "two"), "'two' is not of type 'integer'"),
])
def test_manifest_mistakes_are_caught(mutate, message):
    doc = _job()
    mutate(doc)
    errs = check_custom_resource(doc, load_schemas(SCHEMA_DIR))
    assert any(message in e for e in errs), errs


def test_nulls_dropped_and_defaults_filled_before_validation():
    doc = _job()
    doc["spec"]["suspend"] = None
    del doc["spec"]["submissionMode"]  # defaulted to K8sJobMode by the schema
    assert check_custom_resource(doc, load_schemas(SCHEMA_DIR)) == []


@pytest.mark.parametrize("path", sorted((REPO / "cluster" / "launcher").glob("*.yaml")), ids=lambda p: p.name)
def test_launcher_configs_pass_ray_validation(path):
    cfg = yaml.safe_load(path.read_text())
    assert check_launcher(cfg) == []
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["max_workerz"] = 3
    assert check_launcher(bad)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_pretrain(synth_suite, tmp_path):
    """cluster/README.md step 1 as written: `ray start --head` (token auth, Ray's default), then
    `export RAY_AUTH_MODE=token` and `ray job submit --working-dir . -- python jobs/pretrain.py ...`."""
    import tempfile

    head_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env = dict(head_env, RAY_AUTH_MODE="token")
    ray_tmp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # Ray's socket paths must stay short
    port, dash = _free_port(), _free_port()
    # Every agent on its own free port: beside another Ray on this machine (the session's test
    # cluster), the default agent ports are taken and the head never gets a job agent.
    agents = [f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                      "metrics-export-port", "runtime-env-agent-port",
                                                      "ray-client-server-port")]
    head = subprocess.Popen(
        [RAY_CLI, "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=2",
         f"--temp-dir={ray_tmp}", *agents],
        env=head_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while subprocess.run([RAY_CLI, "job", "list", "--address", address],
                             env=env, capture_output=True).returncode != 0:
            assert time.time() < deadline and head.poll() is None, "the Ray head did not come up"
            time.sleep(1)
        submit = (
            [RAY_CLI, "job", "submit", "--address", address, "--working-dir", str(REPO),
             "--", "python", "jobs/pretrain.py", "--config", "tiny-cpu", "--set", f"data.synth_cache={synth_suite}",
             "--set", f"run.storage={tmp_path / 'runs'}", "--set", "run.name=submitted", "--set", "train.steps=2",
             "--set", "train.batch_size=16", "--set", "checkpoint.every_steps=1", "--set", "scaling.cpus_per_worker=0.5",
             "--set", "eval.at_end=false"])
        while True:  # the head answers `ray job list` before its job agent is up: Ray says to try again
            r = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            out = r.stdout + r.stderr
            if "No available agent to submit job" not in out or time.time() > deadline:
                break
            time.sleep(2)
        assert r.returncode == 0, out[-3000:]
        # the job ran the uploaded working_dir's package (put on its PYTHONPATH by Ray), not this
        # checkout's installed one: a cluster does not need hierdino installed
        code = next(line for line in out.splitlines() if "[hierdino] code" in line)
        assert ray_tmp in code and str(REPO / "hierdino") not in code, code
        import re

        job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", out).group(1)
        status = subprocess.run([RAY_CLI, "job", "status", "--address", address, job_id], env=env, capture_output=True, text=True)
        assert "succeeded" in (status.stdout + status.stderr).lower()
        run = tmp_path / "runs" / "submitted"
        assert sorted(p.name for p in run.glob("checkpoint_0*")) == ["checkpoint_0000001", "checkpoint_0000002"]
        assert (run / "export" / "teacher_backbone.safetensors").exists()
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)  # the head drains, then stops its processes
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)


TWO_NODE_SCRIPT = r"""
import json, os, sys
from ray.cluster_utils import Cluster
from hierdino.config import load_config
from hierdino.train.launch import train

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
cluster.add_node(num_cpus=2)
cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
import ray
ray.init(address=cluster.address)
base = ["tiny-cpu", [f"data.synth_cache={sys.argv[1]}", f"run.storage={sys.argv[2]}", "run.name=two-node",
        f"data.s3_endpoint={os.environ['AWS_ENDPOINT_URL']}", "scaling.num_workers=2", "scaling.placement_strategy=SPREAD",
        "scaling.cpus_per_worker=1", "train.steps=2", "train.batch_size=8", "checkpoint.every_steps=1",
        "eval.at_end=false", "data.num_cpus_per_map=0.5"]]
first = train(load_config(base[0], base[1] + ["train.stop_at_step=1"]))
second = train(load_config(*base))
print("RESULT " + json.dumps({"first": {k: first[k] for k in ("step", "final_checksum", "worker_nodes", "local_param_fraction", "export")},
                              "second": {k: second[k] for k in ("step", "start_step", "start_checksum", "worker_nodes", "export")}}))
ray.shutdown()
cluster.shutdown()
"""


def test_two_node_fsdp_run_checkpoints_to_s3_and_resumes(s3_server, synth_suite, tmp_path):
    s3_server.create_bucket("twonode")
    env = dict(os.environ, AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
               AWS_ENDPOINT_URL=s3_server.endpoint, AWS_REGION="us-east-1", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-c", TWO_NODE_SCRIPT, synth_suite, "s3://twonode/runs"], env=env,
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and lines, (r.stdout + r.stderr)[-4000:]
    res = json.loads(lines[0][len("RESULT "):])
    assert len(set(res["first"]["worker_nodes"])) == 2  # SPREAD: one worker per node
    assert res["first"]["step"] == 1 and res["second"]["start_step"] == 1 and res["second"]["step"] == 2
    assert res["second"]["start_checksum"] == pytest.approx(res["first"]["final_checksum"], rel=1e-12)
    assert res["second"]["export"] == "s3://twonode/runs/two-node/export/teacher_backbone.safetensors"
    from hierdino import storage
    from hierdino.storage import StorageOptions

    opts = StorageOptions(**s3_server.storage_options())
    names = {p.rsplit("/", 2)[-2] for p in storage.list_files("s3://twonode/runs/two-node", ".metadata", opts)}
    assert names == {"checkpoint_0000001", "checkpoint_0000002"}
    # What the single-node FSDP test used to check, here on the two-node run: each rank holds about
    # half the parameters, the run stopped early exports nothing, a log line per step (the stop step
    # included), the saved config, and an export timm loads.
    assert 0.4 < res["first"]["local_param_fraction"] < 0.6 and res["first"]["export"] is None
    run = "s3://twonode/runs/two-node"
    logged = [json.loads(x)["step"] for x in storage.read_bytes(f"{run}/metrics.jsonl", opts).decode().splitlines()]
    assert logged == [1, 2]
    import yaml

    assert yaml.safe_load(storage.read_bytes(f"{run}/config.yaml", opts))["scaling"]["num_workers"] == 2
    export = tmp_path / "export"
    storage.download_dir(f"{run}/export", str(export), opts)
    assert json.loads((export / "model.json").read_text())["arch"] == "vit_tiny_cpu"
    import timm

    import hierdino.models.backbone  # noqa: F401  (registers the tiny archs with timm)

    model = timm.create_model("vit_tiny_cpu", pretrained=True, num_classes=0, img_size=64,
                              pretrained_cfg_overlay={"file": str(export / "teacher_backbone.safetensors")})
    assert model.pos_embed.shape[1] == 65
