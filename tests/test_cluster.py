"""Cluster operations: strict manifest checks, and the documented `ray job submit` sequence on a real
two-node cluster."""

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

from hierdino.cluster_check import (
    BUNDLED_SCHEMAS,
    check_custom_resource,
    check_file,
    check_launcher,
    load_schemas,
)

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


LAUNCHERS = sorted((REPO / "cluster" / "launcher").glob("*.yaml"))
SECRET_NAMES = ("secret-s3.yaml", "prod.secret.yaml")  # the names .gitignore and rsync_exclude must cover


def _cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster specs of a KubeRay manifest: a RayCluster's spec, a RayJob's rayClusterSpec."""
    if doc.get("kind") == "RayCluster":
        return [doc["spec"]]
    if doc.get("kind") == "RayJob":
        return [doc["spec"]["rayClusterSpec"]]
    return []


def _safety_problems(doc: dict) -> list[str]:
    """What keeps a KubeRay manifest from being safe by default: token auth off, or a Ray container
    (head, workers, autoscaler sidecar) without the non-root, no-escalation, no-capabilities context."""
    problems = []
    for spec in _cluster_specs(doc):
        if (spec.get("authOptions") or {}).get("mode") != "token":
            problems.append(f"authOptions: {spec.get('authOptions')!r}, want {{mode: token}}")
        groups = [spec["headGroupSpec"]] + spec.get("workerGroupSpecs", [])
        contexts = [(c["name"], c.get("securityContext") or {}) for g in groups for c in g["template"]["spec"]["containers"]]
        if spec.get("enableInTreeAutoscaling"):
            contexts.append(("autoscaler", (spec.get("autoscalerOptions") or {}).get("securityContext") or {}))
        for name, sc in contexts:
            if not (sc.get("runAsNonRoot") is True and sc.get("runAsUser") == 1000 and sc.get("allowPrivilegeEscalation") is False
                    and "ALL" in (sc.get("capabilities") or {}).get("drop", [])):
                problems.append(f"{name}: securityContext {sc!r}")
    return problems


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifests_use_token_auth_and_a_restricted_security_context(path):
    doc = yaml.safe_load(path.read_text())
    if doc.get("kind") == "Secret":
        return
    assert _cluster_specs(doc) and _safety_problems(doc) == []


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s.pop("authOptions"), "authOptions: None"),
    (lambda s: s.__setitem__("authOptions", {"mode": "disabled"}), "authOptions: {'mode': 'disabled'}"),
    (lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].pop("securityContext"), "ray-head: securityContext {}"),
    (lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["securityContext"].__setitem__("runAsUser", 0),
     "ray-worker: securityContext"),
    (lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["securityContext"].pop("capabilities"),
     "ray-worker: securityContext"),
    (lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0]["securityContext"].__setitem__("allowPrivilegeEscalation", True),
     "ray-head: securityContext"),
])
def test_safety_check_catches_an_unsafe_manifest(mutate, message):
    doc = _job()
    mutate(doc["spec"]["rayClusterSpec"])
    assert any(message in p for p in _safety_problems(doc)), _safety_problems(doc)
    cluster = yaml.safe_load((REPO / "cluster/kuberay/raycluster.yaml").read_text())
    cluster["spec"]["autoscalerOptions"].pop("securityContext")
    assert _safety_problems(cluster) == ["autoscaler: securityContext {}"]


def test_safe_settings_sit_where_the_kuberay_crds_take_them():
    """authOptions belongs to the cluster spec (a RayJob's rayClusterSpec, not its spec): the strict
    CRD check accepts it there and refuses it one level up."""
    doc = _job()
    doc["spec"]["authOptions"] = doc["spec"]["rayClusterSpec"].pop("authOptions")
    errs = check_custom_resource(doc, load_schemas(SCHEMA_DIR))
    assert any("'authOptions' was unexpected" in e for e in errs), errs


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_heads_keep_the_dashboard_on_localhost_and_sync_no_secrets(path):
    import fnmatch

    text = path.read_text()
    assert "0.0.0.0" not in text
    cfg = yaml.safe_load(text)
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    excludes = cfg.get("rsync_exclude", [])
    for name in SECRET_NAMES:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in excludes), (name, excludes)
    assert ".gitignore" in cfg.get("rsync_filter", [])


def test_a_secret_file_in_the_repository_root_is_neither_committed_nor_uploaded(tmp_path):
    """`secret-s3.yaml` (and `*.secret.yaml`) in the repository root: git ignores it, and the zip that
    `ray job submit --working-dir .` uploads leaves it out (Ray's own packaging, honouring .gitignore
    as the job SDK does unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1), on a copy of the tracked tree."""
    import shutil
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    for name in SECRET_NAMES:  # not ignored, or already committed: check-ignore exits 1
        r = subprocess.run(["git", "check-ignore", "-q", name], cwd=REPO)
        assert r.returncode == 0, f"git does not ignore {name}"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    tree = tmp_path / "repo"
    for rel in filter(None, tracked):
        if (REPO / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / rel, tree / rel)
    assert (tree / ".gitignore").is_file()
    for name in SECRET_NAMES:
        (tree / name).write_text("stringData: {AWS_SECRET_ACCESS_KEY: not-a-real-key}\n")
    package = tmp_path / "working_dir.zip"
    create_package(str(tree), package, include_gitignore=True)
    names = set(zipfile.ZipFile(package).namelist())
    assert "jobs/pretrain.py" in names and "cluster/kuberay/secret-s3.example.yaml" in names
    assert not names & set(SECRET_NAMES), sorted(names & set(SECRET_NAMES))


def test_docs_keep_the_secret_file_outside_the_repository():
    import re

    for doc in ("cluster/README.md", "cluster/kuberay/secret-s3.example.yaml"):
        targets = re.findall(r"cp cluster/kuberay/secret-s3\.example\.yaml (\S+)", (REPO / doc).read_text())
        assert targets, doc
        for target in targets:
            assert target.startswith(("~/", "$HOME/", "/")), (doc, target)


_HANDED_OUT: set[int] = set()


def _free_ports(n: int) -> list[int]:
    """``n`` free ports, none handed out before in this session: the sockets are held open together
    while picking, and a port an earlier call gave (closed since, so the OS may give it again) is
    skipped. A head whose dashboard port was also its node manager's would not start."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            socks.append(socket.socket())
            socks[-1].bind(("127.0.0.1", 0))
            if (port := socks[-1].getsockname()[1]) not in _HANDED_OUT:
                ports.append(port)
        _HANDED_OUT.update(ports)
        return ports
    finally:
        for s in socks:
            s.close()


def _ray_start(args: list, env: dict, ray_tmp: str) -> subprocess.Popen:
    """`ray start ... --block` with every port its own (beside the session's test cluster the default
    agent ports are taken, and two nodes on one machine must not share them); its output goes to
    ``<ray_tmp>/ray-start.log`` (``_log_tail``)."""
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "node-manager-port", "object-manager-port")
    ports = [f"--{name}={port}" for name, port in zip(names, _free_ports(len(names)))]
    log_path = os.path.join(ray_tmp, "ray-start.log")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([RAY_CLI, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                                 f"--temp-dir={ray_tmp}", *ports, *args],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log_path
    return proc


def _log_tail(proc: subprocess.Popen, chars: int = 1500) -> str:
    """The end of a `_ray_start` node's output."""
    with open(proc.log_path, errors="replace") as f:
        return f.read()[-chars:]


def _stop(*procs: subprocess.Popen) -> None:
    """SIGTERM to each `ray start --block` (not its process group: signalled together, its processes
    die under the monitor, which then hangs for minutes). A head stops in ~3 s; a joined node drains
    for ~30 s, so after 10 s its process group is killed (a test cluster holds nothing to save)."""
    running = [p for p in procs if p is not None and p.poll() is None]
    for p in running:
        os.kill(p.pid, signal.SIGTERM)
    deadline = time.time() + 10
    for p in running:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def test_documented_cluster_runs_a_two_node_fsdp_job_on_s3_that_resumes(s3_server, synth_suite, tmp_path):
    """cluster/README.md step 1 as written, on two nodes: `ray start --head` (token auth, Ray's
    default), a second node joining it, `export RAY_AUTH_MODE=token`, then `ray job submit
    --working-dir . -- python jobs/pretrain.py ...` twice: FSDP over 2 workers placed on different
    nodes (SPREAD) with checkpoints in S3 (SeaweedFS), stopped after step 1, then resumed to step 2."""
    import re
    import tempfile

    s3_server.create_bucket("twonode")
    creds = dict(AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
                 AWS_ENDPOINT_URL=s3_server.endpoint, AWS_REGION="us-east-1")
    # the nodes hold the credentials (as a pod's environment would); the client only the token mode
    node_env = dict({k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}, **creds)
    env = dict({k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, RAY_AUTH_MODE="token")
    ray_tmp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # Ray's socket paths must stay short
    port, dash, client = _free_ports(3)
    head = _ray_start(["--head", f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                       f"--ray-client-server-port={client}"], node_env, ray_tmp)
    second = None
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while subprocess.run([RAY_CLI, "job", "list", "--address", address], env=env, capture_output=True).returncode != 0:
            assert time.time() < deadline and head.poll() is None, "the Ray head did not come up: " + _log_tail(head)
            time.sleep(1)
        # its own temp dir: two nodes unpacking the job's working_dir into one directory pull it from
        # under each other's workers
        def start_second() -> subprocess.Popen:
            return _ray_start([f"--address=127.0.0.1:{port}"], dict(node_env, RAY_AUTH_MODE="token"),
                              tempfile.mkdtemp(prefix="rn-", dir="/tmp"))

        second, first_try = start_second(), ""
        while True:  # SPREAD is a preference: submit once both nodes are in
            r = subprocess.run([RAY_CLI, "list", "nodes", "--address", address, "--format", "yaml"],
                               env=env, capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.count("state: ALIVE") == 2:
                break
            if second.poll() is not None and not first_try:  # it exited at start (a port taken since it
                first_try = _log_tail(second)                # was picked, by the session's Ray): once more
                second = start_second()
                continue
            assert time.time() < deadline and second.poll() is None, (
                f"the second node did not join: {_log_tail(second)}\n{r.stderr[-1000:]}\nfirst try: {first_try}")
            time.sleep(1)
        base = ["--config", "tiny-cpu", "--set", f"data.synth_cache={synth_suite}", "--set", "run.storage=s3://twonode/runs",
                "--set", "run.name=two-node", "--set", f"data.s3_endpoint={s3_server.endpoint}",
                "--set", "scaling.num_workers=2", "--set", "scaling.placement_strategy=SPREAD",
                "--set", "scaling.cpus_per_worker=1", "--set", "data.num_cpus_per_map=0.5", "--set", "train.steps=2",
                "--set", "train.batch_size=8", "--set", "checkpoint.every_steps=1", "--set", "eval.at_end=false"]

        def submit(*extra) -> str:
            cmd = [RAY_CLI, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                   "python", "jobs/pretrain.py", *base, *extra]
            while True:  # the head answers `ray job list` before its job agent is up: Ray says to try again
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
                out = r.stdout + r.stderr
                if "No available agent to submit job" not in out or time.time() > deadline:
                    break
                time.sleep(2)
            assert r.returncode == 0 and re.search(r"Job '(raysubmit_\w+)' succeeded", out), out[-4000:]
            return out

        first = submit("--set", "train.stop_at_step=1")
        second_out = submit()
    finally:
        _stop(second, head)
    # the job ran the uploaded working_dir's package (put on its PYTHONPATH by Ray), not this
    # checkout's installed one: a cluster does not need hierdino installed
    code = next(line for line in first.splitlines() if "[hierdino] code" in line)
    assert ray_tmp in code and str(REPO / "hierdino") not in code, code
    workers = [re.search(r"workers +2 on (\d) node\(s\); student parameter checksum (\S+) at step (\d+), (\S+) at step (\d+)",
                         out) for out in (first, second_out)]
    assert all(workers), (first + second_out)[-4000:]
    (nodes1, _, s1, end1, e1), (nodes2, start2, s2, _, e2) = (w.groups() for w in workers)
    assert nodes1 == nodes2 == "2"  # SPREAD: one worker per node
    assert (s1, e1, s2, e2) == ("0", "1", "1", "2")
    assert float(start2) == pytest.approx(float(end1), rel=1e-12)  # the resumed shards are the saved ones
    assert "resuming after step 1" in second_out
    fraction = float(re.search(r"local parameter fraction ([0-9.]+)", first).group(1))
    assert 0.4 < fraction < 0.6  # FSDP: each rank holds about half the parameters
    assert "export      none" in first and "export      s3://twonode/runs/two-node/export/teacher_backbone.safetensors" in second_out

    from hierdino import storage
    from hierdino.storage import StorageOptions

    opts = StorageOptions(**s3_server.storage_options())
    names = {p.rsplit("/", 2)[-2] for p in storage.list_files("s3://twonode/runs/two-node", ".metadata", opts)}
    assert names == {"checkpoint_0000001", "checkpoint_0000002"}
    run = "s3://twonode/runs/two-node"
    logged = [json.loads(x)["step"] for x in storage.read_bytes(f"{run}/metrics.jsonl", opts).decode().splitlines()]
    assert logged == [1, 2]
    assert yaml.safe_load(storage.read_bytes(f"{run}/config.yaml", opts))["scaling"]["num_workers"] == 2
    export = tmp_path / "export"
    storage.download_dir(f"{run}/export", str(export), opts)
    assert json.loads((export / "model.json").read_text())["arch"] == "vit_tiny_cpu"
    import timm

    import hierdino.models.backbone  # noqa: F401  (registers the tiny archs with timm)

    model = timm.create_model("vit_tiny_cpu", pretrained=True, num_classes=0, img_size=64,
                              pretrained_cfg_overlay={"file": str(export / "teacher_backbone.safetensors")})
    assert model.pos_embed.shape[1] == 65
