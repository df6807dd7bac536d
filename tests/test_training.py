"""Ray Train runs of the tiny preset on the session's 2-CPU Ray cluster (FSDP2 over two workers and
its resume: test_cluster.py's two-node run; faults: test_faults.py)."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO


def test_pretrain_validate_only_catches_bad_key():
    r = subprocess.run([sys.executable, str(REPO / "jobs/pretrain.py"), "--set", "train.stpes=3", "--validate-only"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "did you mean train.steps" in r.stderr
    r = subprocess.run([sys.executable, str(REPO / "jobs/pretrain.py"), "--config", "vitl14", "--validate-only"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "config OK" in r.stdout
    # a manifest's storage is the cluster's: --offline never waits for a store this machine cannot reach
    r = subprocess.run([sys.executable, str(REPO / "jobs/pretrain.py"), "--config", "vitl14", "--validate-only", "--offline",
                        "--set", "run.storage=s3://no-such-bucket-here/runs"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "run directory not checked (--offline)" in r.stdout and "retrying" not in r.stdout + r.stderr


def test_embedded_default_stopped_by_ctrl_c_then_resumed_to_the_end(ray_cluster, synth_suite, tmp_path):
    """`pretrain.py` as a user runs it (one progress line per log step, start and end blocks,
    TensorBoard files), interrupted by Ctrl-C (SIGINT to the driver; Ray Train's own handler, which
    aborts, must not replace the graceful stop's; SIGTERM, a Kubernetes eviction, takes the same
    handler): it checkpoints the step in flight and exits 0; the same command resumes there and
    finishes with the evaluation."""
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    cmd = [sys.executable, str(REPO / "jobs/pretrain.py"), "--set", f"data.synth_cache={synth_suite}",
           "--set", f"run.storage={tmp_path}", "--set", "train.steps=15", "--set", "train.batch_size=16",
           "--set", "scaling.cpus_per_worker=0.5", "--set", "checkpoint.every_steps=100", "--set", "train.log_every=3",
           "--set", "eval.bootstrap=200", "--set", "eval.datasets=[synth-ext-1]"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    first = []
    for line in p.stdout:  # wait until training is under way
        first.append(line)
        if "step 3/15 | loss" in line:
            p.send_signal(signal.SIGINT)
            break
    rest, _ = p.communicate(timeout=300)
    text = "".join(first) + rest
    assert p.returncode == 0, text[-3000:]
    import re

    stopped = re.search(r"stopped by SIGINT after step (\d+); checkpoint (\S+)\. Run the same command again", text)
    assert stopped, text[-3000:]
    step = int(stopped.group(1))
    assert 3 <= step < 15 and stopped.group(2).endswith(f"checkpoint_{step:07d}")
    from hierdino.train.checkpoint import latest_complete

    assert latest_complete(str(tmp_path / "tiny-cpu")).step == step  # committed, checked by reading
    assert not (tmp_path / "tiny-cpu" / "export").exists()

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert f"resuming after step {step}" in out and f"step {step}/15 | loss" not in out  # no step repeated
    logged_steps = [s for s in range(step + 1, 16) if s % 3 == 0 or s == 15]
    assert [out.count(f"step {s}/15 | loss") for s in logged_steps] == [1] * len(logged_steps), out[-3000:]
    assert "Execution plan of Dataset" not in out + r.stderr and "No pretrained configuration" not in out + r.stderr
    assert "[hierdino] model     vit_tiny_cpu at 64 px: backbone" in out
    assert "changed: data.synth_cache:" in out and "train.steps: 500 -> 15" in out
    tail = out.strip().splitlines()[-2:]
    assert tail[0] == f"[hierdino] run         {tmp_path}/tiny-cpu"
    assert tail[1].endswith("export/teacher_backbone.safetensors")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tiny-cpu" / "tb")).Reload()  # both runs' files
    logged = [json.loads(line) for line in (tmp_path / "tiny-cpu" / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Scalars("loss/dino")] == [m["step"] for m in logged]
    assert [m["step"] for m in logged][-len(logged_steps):] == logged_steps and logged[0]["step"] == 3
    assert [e.value for e in events.Scalars("collapse/dino_entropy")] == pytest.approx([m["dino_entropy"] for m in logged])
    assert "schedule/lr" in events.Tags()["scalars"]
    assert any(t.startswith("eval/final_synth-ext-1_") for t in events.Tags()["scalars"])  # the evaluation at the end


def test_pretrain_refuses_unusable_inputs_before_ray_starts(tmp_path):
    """A missing init_weights file and an external set without a val split: said by --validate-only,
    and by a real run before Ray starts (no 'Started a local Ray instance' in its output)."""
    from hierdino.data.shards import Record, write_dataset

    write_dataset([Record(b"x", f"i{k}", "s", None, lab, "train") for k, lab in enumerate(["monocyte", "neutrophil"])],
                  str(tmp_path / "onesplit"), "onesplit", "s")
    base = [sys.executable, str(REPO / "jobs/pretrain.py"), "--set", f"run.storage={tmp_path}/runs"]
    for extra, message in ((["--set", f"model.init_weights={tmp_path}/none.pth"], f"storage error: model.init_weights: no file at {tmp_path}/none.pth"),
                           (["--set", f"eval.datasets=[{tmp_path}/onesplit]"], "eval data error: external evaluation sets the probes cannot use")):
        for mode in (["--validate-only"], ["--local-cpus", "1"]):
            r = subprocess.run(base + extra + mode, capture_output=True, text=True, timeout=120)
            assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
            assert "Started a local Ray instance" not in r.stdout + r.stderr


def test_a_job_upload_directory_refuses_relative_output_paths_and_a_resume_needs_no_init_weights(tmp_path, monkeypatch):
    from hierdino.cli.args import upload_dir_problem
    from hierdino.config import load_config
    from hierdino.storage import StorageError
    from hierdino.train.inputs import check_inputs

    upload = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"  # Ray 2.60's layout
    upload.mkdir(parents=True)
    monkeypatch.chdir(upload)
    for uri in ("./runs", "runs", "file://runs"):
        assert "which Ray deletes with its session" in upload_dir_problem(uri, "run.storage")
    for uri in ("/abs/runs", "file:///abs/runs", "s3://bucket/runs", "~/runs"):
        assert upload_dir_problem(uri, "run.storage") is None
    monkeypatch.chdir(tmp_path)  # not a job's upload: a relative path is the user's own
    assert upload_dir_problem("runs", "run.storage") is None
    # a run that resumes reads its weights from its checkpoint, not from model.init_weights
    cfg = load_config("tiny-cpu", [f"model.init_weights={tmp_path}/moved.pth", f"data.synth_cache={tmp_path}/cache"])
    with pytest.raises(StorageError, match="model.init_weights: no file at"):
        check_inputs(cfg, unbuilt_suite_ok=True)
    assert check_inputs(cfg, unbuilt_suite_ok=True, resuming=True) is None  # the suite is not built yet: nothing read
