"""Ray Train runs of the tiny preset on the session's 2-CPU Ray cluster."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from hierdino.config import load_config
from hierdino.train.launch import train


def _cfg(tmp_path, suite, name, *extra):
    return load_config("tiny-cpu", [
        f"data.synth_cache={suite}", f"run.storage={tmp_path}", f"run.name={name}", "train.batch_size=16",
        "train.steps=8", "checkpoint.every_steps=4", "train.log_every=2", "data.num_cpus_per_map=0.5",
        "scaling.cpus_per_worker=0.5", "eval.at_end=false", *extra])


def _metrics(run_dir):
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def test_two_worker_fsdp_run_shards_parameters_and_resumes_identically(ray_cluster, synth_suite, tmp_path):
    """FSDP2 over 2 workers; stopped after its first checkpoint and started again, the run resumes
    with the exact parameters it saved (the S3 / two-node variant is in test_cluster.py)."""
    over = ("scaling.num_workers=2", "train.steps=6", "checkpoint.every_steps=3")
    first = train(_cfg(tmp_path, synth_suite, "fsdp2", *over, "train.stop_at_step=3"))
    assert first["step"] == 3 and first["export"] is None
    assert 0.4 < first["local_param_fraction"] < 0.6  # each rank holds about half
    second = train(_cfg(tmp_path, synth_suite, "fsdp2", *over))
    assert second["start_step"] == 3 and second["step"] == 6
    assert second["start_checksum"] == pytest.approx(first["final_checksum"], rel=1e-12, abs=0)
    assert second["final_checksum"] != pytest.approx(first["final_checksum"], rel=1e-9)
    assert [m["step"] for m in _metrics(second["run_dir"])] == [2, 3, 4, 6]  # log steps and the stop step
    export = Path(second["export"])
    assert export.exists() and json.loads((export.parent / "model.json").read_text())["arch"] == "vit_tiny_cpu"
    assert load_config(str(Path(second["run_dir"]) / "config.yaml")).scaling.num_workers == 2
    import timm

    model = timm.create_model("vit_tiny_cpu", pretrained=True, num_classes=0, img_size=64,
                              pretrained_cfg_overlay={"file": str(export)})
    assert model.pos_embed.shape[1] == 65


def test_pretrain_validate_only_catches_bad_key():
    r = subprocess.run([sys.executable, str(REPO / "jobs/pretrain.py"), "--set", "train.stpes=3", "--validate-only"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "did you mean train.steps" in r.stderr
    r = subprocess.run([sys.executable, str(REPO / "jobs/pretrain.py"), "--config", "vitl14", "--validate-only"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "config OK" in r.stdout


def test_embedded_default_stopped_by_sigterm_then_resumed_to_the_end(ray_cluster, synth_suite, tmp_path):
    """`pretrain.py` as a user runs it (one progress line per log step, start and end blocks,
    TensorBoard files), interrupted as Kubernetes evicts a pod (SIGTERM to the driver): it checkpoints
    the step in flight and exits 0; the same command resumes there and finishes with the evaluation."""
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    cmd = [sys.executable, str(REPO / "jobs/pretrain.py"), "--set", f"data.synth_cache={synth_suite}",
           "--set", f"run.storage={tmp_path}", "--set", "train.steps=30", "--set", "train.batch_size=16",
           "--set", "scaling.cpus_per_worker=0.5", "--set", "checkpoint.every_steps=100", "--set", "train.log_every=3",
           "--set", "eval.bootstrap=200", "--set", "eval.datasets=[synth-ext-1]"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    first = []
    for line in p.stdout:  # wait until training is under way
        first.append(line)
        if "step 3/30 | loss" in line:
            p.send_signal(signal.SIGTERM)
            break
    rest, _ = p.communicate(timeout=300)
    text = "".join(first) + rest
    assert p.returncode == 0, text[-3000:]
    import re

    stopped = re.search(r"stopped by SIGTERM after step (\d+); checkpoint (\S+)\. Run the same command again", text)
    assert stopped, text[-3000:]
    step = int(stopped.group(1))
    assert 3 <= step < 30 and stopped.group(2).endswith(f"checkpoint_{step:07d}")
    from hierdino.train.checkpoint import latest_complete

    assert latest_complete(str(tmp_path / "tiny-cpu")).step == step  # committed, checked by reading
    assert not (tmp_path / "tiny-cpu" / "export").exists()

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert f"resuming after step {step}" in out and f"step {step}/30 | loss" not in out  # no step repeated
    logged_steps = [s for s in range(step + 1, 31) if s % 3 == 0 or s == 30]
    assert [out.count(f"step {s}/30 | loss") for s in logged_steps] == [1] * len(logged_steps), out[-3000:]
    assert "Execution plan of Dataset" not in out + r.stderr and "No pretrained configuration" not in out + r.stderr
    assert "[hierdino] model     vit_tiny_cpu at 64 px: backbone" in out
    assert "changed: data.synth_cache:" in out and "train.steps: 500 -> 30" in out
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
