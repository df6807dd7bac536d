"""Faults a long run meets, with real components: processes killed with signals, a SeaweedFS server
stopped and restarted, a NaN injected through a test-only hook (``HIERDINO_TEST_*``)."""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, capture_log

from hierdino import storage
from hierdino.config import load_config
from hierdino.config.compat import ResumeError, check_compatible
from hierdino.train.checkpoint import COMMIT, CORRUPT, latest_complete, verify
from hierdino.train.resume import plan_start


def _pretrain(tmp_path, suite, *sets, env=None, local=False):
    """``jobs/pretrain.py`` as a user runs it; on the session's cluster unless ``local`` (its own Ray)."""
    cmd = [sys.executable, str(REPO / "jobs/pretrain.py"), "--no-eval"]
    if local:
        cmd += ["--local-cpus", "2", "--no-dashboard"]
    return subprocess.Popen(cmd + _sets(tmp_path, suite, *sets), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=tmp_path)


def _sets(tmp_path, suite, *sets):
    out = []
    for s in ("train.batch_size=16", "train.log_every=1", "data.num_cpus_per_map=0.5", "scaling.cpus_per_worker=0.5",
              f"data.synth_cache={suite}", f"run.storage={tmp_path}", *sets):
        out += ["--set", s]
    return out


def test_kill_while_writing_a_checkpoint_then_nan_then_changed_config(ray_cluster, synth_suite, tmp_path):
    """1. The worker dies (SIGKILL) half-way through writing checkpoint 6: the restarted worker skips
    it (no commit marker) and resumes from checkpoint 3. 2. The resumed run meets a NaN at step 8:
    it stops naming step 8, and checkpoint 6 (written again after the resume) stays the newest
    complete one. 3. Resuming with a changed loss weight is refused, naming the key, before any
    cluster work (`--validate-only` too)."""
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address,
               HIERDINO_TEST_KILL_IN_CHECKPOINT="6", HIERDINO_TEST_KILL_IN_CHECKPOINT_DIR=str(tmp_path),
               HIERDINO_TEST_NAN_AT_STEP="8")
    base = ("run.name=faulty", "checkpoint.every_steps=3", "checkpoint.keep=2", "scaling.max_failures=1", "train.steps=9")
    p = _pretrain(tmp_path, synth_suite, *base, env=env)
    out, _ = p.communicate(timeout=600)
    assert (tmp_path / "HIERDINO_TEST_KILL_IN_CHECKPOINT.6.done").exists()  # the kill happened
    assert "skipped checkpoint_0000006: no commit marker" in out and "resuming at step 3" in out, out[-4000:]
    assert p.returncode != 0 and "non-finite loss at step 8" in out and "dino=nan" in out, out[-4000:]
    run = tmp_path / "faulty"
    found = latest_complete(str(run))
    assert found.step == 6 and not found.skipped  # nothing of the failed window was committed
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_0000003", "checkpoint_0000006"]  # keep=2
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    # 4-6, logged before the kill and again after the resume from 3, appear once; 8 was never applied
    assert steps == list(range(1, 8))

    check = [sys.executable, str(REPO / "jobs/pretrain.py"), "--validate-only"] + _sets(tmp_path, synth_suite, *base)
    r = subprocess.run(check + ["--set", "loss.koleo_weight=0.5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "resume error" in r.stderr and "loss.koleo_weight: 0.0 -> 0.5" in r.stderr, r.stderr[-3000:]


def test_resume_rules_without_a_cluster(tmp_path, said):
    """The checks behind a restart, on a hand-made run directory: an uncommitted or truncated checkpoint
    is skipped with its reason; operational keys may change, recipe keys may not; run.resume=false
    starts fresh in <name>-2."""
    run = tmp_path / "r"
    for step, commit in ((3, True), (6, True), (9, False)):
        d = run / f"checkpoint_{step:07d}"
        d.mkdir(parents=True)
        (d / "__0_0.distcp").write_bytes(b"x" * 10)
        (d / "manifest_rank0.json").write_text(json.dumps({"files": {"__0_0.distcp": 10}}))
        if commit:
            (d / COMMIT).write_text(json.dumps({"step": step, "world": 1}))
    (run / "checkpoint_0000006" / "__0_0.distcp").write_bytes(b"x" * 4)  # truncated after its commit
    found = latest_complete(str(run))
    assert found.step == 3 and found.skipped == ["checkpoint_0000009: no commit marker (interrupted while being written)",
                                                 "checkpoint_0000006: __0_0.distcp is 4 bytes, not 10"]
    cfg = load_config("tiny-cpu", [f"run.storage={tmp_path}", "run.name=r"])
    (run / "config.yaml").write_text(cfg.to_yaml())
    check_compatible(cfg, load_config("tiny-cpu", ["train.steps=900", "scaling.num_workers=2", "eval.split=test"]), "r")
    with pytest.raises(ResumeError, match=r"model.arch: vit_tiny_cpu -> vit_micro_cpu; optim.base_lr"):
        check_compatible(cfg, load_config("tiny-cpu", ["model.arch=vit_micro_cpu", "optim.base_lr=0.1"]), "r")
    from hierdino.train.checkpoint import run_uri

    fresh = load_config("tiny-cpu", [f"run.storage={tmp_path}", "run.name=r", "run.resume=false"])
    start = plan_start(fresh, run_uri, quiet=True)
    assert start.name == "r-2" and start.uri.endswith("/r-2") and start.found.uri is None and fresh.run.name == "r-2"

    # A resume that lengthens the run says what changed and where its LR jumps (cosine over the new length).
    sets = [f"run.storage={tmp_path}", "run.name=r", "optim.warmup_steps=0"]
    (run / "config.yaml").write_text(load_config("tiny-cpu", sets + ["train.steps=6"]).to_yaml())
    longer = load_config("tiny-cpu", sets + ["train.steps=900"])
    assert plan_start(longer, run_uri).found.step == 3
    lr0, low = 0.01 * math.sqrt(32 / 1024), longer.optim.min_lr  # tiny-cpu: base LR 0.01, batch 32
    was, now = (low + 0.5 * (lr0 - low) * (1 + math.cos(math.pi * 3 / total)) for total in (6, 900))
    assert "[hierdino] resuming with a changed train.steps: 6 -> 900" in said, said
    assert any(f"at step 3 the LR goes from {was:.3g} to {now:.3g}" in line for line in said), (said, was, now)


def test_a_step_saved_again_in_place_is_not_vouched_for_by_its_old_marker(tmp_path, monkeypatch):
    """Checkpoint 6 is complete; a later save of step 6 (after a resume from an earlier one) dies
    after overwriting a shard with bytes of the same size: the old marker must not make the mix of
    old and new files pass as complete."""
    import torch

    from hierdino.train import checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    mgr = checkpoint.CheckpointManager(model, opt, 0, 1, str(tmp_path / "run"), keep=2)
    mgr.save(6, {"images_seen": 0})
    ckpt = tmp_path / "run" / "checkpoint_0000006"
    assert verify(str(ckpt)) is None and mgr.load()["step"] == 6

    def dies_half_way(state, storage_writer):
        shard = next(p for p in Path(storage_writer.path).iterdir() if p.suffix == ".distcp")
        shard.write_bytes(b"\0" * shard.stat().st_size)
        raise RuntimeError("killed")

    monkeypatch.setattr(checkpoint.dcp, "save", dies_half_way)
    with pytest.raises(RuntimeError, match="killed"):
        mgr.save(6, {"images_seen": 0})
    assert verify(str(ckpt)) == "no commit marker (interrupted while being written)"


def _drain(p, lines):
    """Read the run's output into ``lines`` on a thread (so the pipe never fills while a test waits on
    something else); returns the thread."""
    import threading

    def read():
        for line in p.stdout:
            lines.append(line)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def _until(cond, p, lines, what, timeout=300):
    """Wait for ``cond()``; fail naming ``what`` (with the output's tail) if the run ends first or the
    hang guard ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert p.poll() is None and time.monotonic() < deadline, f"{what}: " + "".join(lines)[-3000:]
        time.sleep(0.05)


def test_object_store_outage_during_a_run(s3_server, synth_suite, tmp_path):
    """One run on S3 storage (run.storage_retry_s=30). SeaweedFS is stopped exactly as checkpoint 8
    begins (the test-only HIERDINO_TEST_PAUSE_BEFORE_CHECKPOINT hook holds the worker there until the
    store is down: no timing window) and restarted once the run said it is retrying a checkpoint-8
    call: the run goes on, every step logged and checkpointed. Stopped again for good after step 14:
    the run stops with an error naming the URI and the operation, without the secret, and its last
    checkpoint (12) is complete and loads."""
    s3_server.create_bucket("outage")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
               AWS_ENDPOINT_URL=s3_server.endpoint, AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
               HIERDINO_TEST_PAUSE_BEFORE_CHECKPOINT="8", HIERDINO_TEST_PAUSE_BEFORE_CHECKPOINT_DIR=str(tmp_path))
    reached, go = (tmp_path / f"HIERDINO_TEST_PAUSE_BEFORE_CHECKPOINT.8.{x}" for x in ("reached", "go"))
    opts = storage.StorageOptions(**s3_server.storage_options())
    lines: list[str] = []
    p = _pretrain(tmp_path, synth_suite, "run.storage=s3://outage/runs", "run.name=flaky", "checkpoint.every_steps=4",
                  "train.steps=40", "run.storage_retry_s=30", "scaling.max_failures=0", env=env, local=True)
    reader = _drain(p, lines)
    retry = re.compile(r"storage: cannot \w+( \w+)? s3://outage/runs/flaky/checkpoint_0000008\b.*retrying for up to 30 s")
    try:
        _until(reached.exists, p, lines, "checkpoint 8 never began")
        s3_server.outage()  # down before checkpoint 8's first storage call
        go.touch()
        _until(lambda: any(retry.search(x) for x in lines), p, lines, "checkpoint 8 did not meet the outage")
        s3_server.back()
        _until(lambda: any("step 14/40 | loss" in x for x in lines), p, lines, "the run did not go on to step 14")
        s3_server.outage()
        p.wait(timeout=300)
        reader.join(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
        s3_server.back()
    out = "".join(lines)
    assert "retrying for up to 30 s" in out, out[-4000:]  # the first outage was met, and waited out
    assert p.returncode == 2, out[-4000:]  # the worker's StorageError, reported as the driver's own would be
    # the first storage call of the next checkpoint names itself: the stale-marker check or a write
    assert re.search(r"storage error: cannot (write|delete|look up) s3://outage/runs/flaky/", out), out[-4000:]
    assert "retry window 30 s" in out, out[-4000:]
    assert s3_server.secret_key not in out
    found = latest_complete("s3://outage/runs/flaky", opts)
    assert found.step == 12 and verify(found.uri, opts) is None
    logged = [json.loads(x)["step"] for x in storage.read_bytes("s3://outage/runs/flaky/metrics.jsonl", opts).decode().splitlines()]
    assert logged[:12] == list(range(1, 13))  # no step lost to the first outage
    import torch.distributed.checkpoint as dcp

    local = tmp_path / "restore"
    storage.download_dir(found.uri, str(local), opts)
    assert any(k.startswith("model.") for k in dcp.FileSystemReader(str(local)).read_metadata().state_dict_metadata)


def _s3_checkpoint_rank(rank: int, world: int, init: str, run: str, opts: dict, out: str, action: str) -> None:
    """One rank of a 2-rank FSDP2 job on a small MLP: ``save`` a checkpoint to S3 after one AdamW step,
    or ``load`` it, recording the bytes this rank fetched and the full tensors it restored."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from hierdino.train import checkpoint, dcp_storage

    dcp_storage.CRC_BLOCK = 4096  # blocks much smaller than these shards: a rank's half is about half the blocks
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        mgr = checkpoint.CheckpointManager(model, opt, rank, world, run, keep=2, options=storage.StorageOptions(**opts))
        record = {}
        if action == "save":
            model(torch.randn(8, 64)).square().mean().backward()
            opt.step()
            mgr.save(5, {"images_seen": 40})
        else:
            fetched, real = [], dcp_storage.fetch

            def counted(fs, path, start, end, where):
                data = real(fs, path, start, end, where)
                fetched.append(len(data) if where.endswith(".distcp") else 0)
                return data
            dcp_storage.fetch = counted
            said = []
            capture_log(said)
            state = mgr.load()
            record["step"], record["said"] = state and state["step"], said
            record["fetched"] = sum(fetched)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # on rank 0
        record["params"] = {k: v.flatten().tolist() for k, v in full.items()}
        record["adam"] = sorted(float(s["exp_avg_sq"].full_tensor().sum()) for s in opt.state.values()) if opt.state else []
        with open(f"{out}/{action}{world}_{rank}.json", "w") as f:
            json.dump(record, f)
    finally:
        dist.destroy_process_group()


def test_a_rank_restoring_from_s3_fetches_its_own_shards_and_any_world_size_restores_the_same_state(s3_server, tmp_path):
    """A 2-rank FSDP2 checkpoint on S3 (SeaweedFS): restored by 2 ranks, each fetches about its own half
    of the shard bytes (not the whole checkpoint); by 1 rank, all of them. Both restore the saved
    parameters and Adam moments exactly."""
    import socket

    import torch

    s3_server.create_bucket("ckpt")
    run = "s3://ckpt/runs/sharded"

    def spawn(world, action):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(_s3_checkpoint_rank, nprocs=world, args=(
            world, f"tcp://127.0.0.1:{port}", run, s3_server.storage_options(), str(tmp_path), action))
        return [json.loads((tmp_path / f"{action}{world}_{r}.json").read_text()) for r in range(world)]

    saved = spawn(2, "save")[0]
    opts = storage.StorageOptions(**s3_server.storage_options())
    shards = {k: v for k, v in storage.file_sizes(f"{run}/checkpoint_0000005", opts).items() if k.endswith(".distcp")}
    assert len(shards) == 2, shards
    total = sum(shards.values())
    for world in (2, 1):
        loaded = spawn(world, "load")
        assert loaded[0]["params"] == saved["params"] and len(saved["params"]) == 4
        for rec in loaded:
            assert rec["step"] == 5 and rec["adam"] == saved["adam"] and len(saved["adam"]) == 4
        got = [rec["fetched"] for rec in loaded]
        if world == 2:  # each rank holds half of every tensor: about half the bytes, and far from all of them
            assert all(0.3 * total < g < 0.7 * total for g in got), (got, total)
        else:
            assert 0.9 * total < got[0] <= total, (got, total)

    # One byte of rank 1's shard changed in the store: only rank 1 reads it, and both ranks skip the
    # checkpoint together (the only one: a fresh start) instead of one of them waiting for the other.
    shard = f"{run}/checkpoint_0000005/__1_0.distcp"
    data = bytearray(storage.read_bytes(shard, opts))
    data[len(data) // 2] ^= 0x40
    storage.write_bytes(shard, bytes(data), opts)
    loaded = spawn(2, "load")
    assert [rec["step"] for rec in loaded] == [None, None], loaded
    assert re.match(r"\[hierdino\] skipped checkpoint_0000005: corrupt: s3://ckpt/runs/sharded/checkpoint_0000005/"
                    r"__1_0\.distcp: bytes \d+-\d+ differ from when they were written", loaded[0]["said"][0]), loaded[0]
    assert latest_complete(run, opts).skipped[0].startswith("checkpoint_0000005: marked corrupt by an earlier restore")


def test_a_torn_or_edited_marker_or_manifest_makes_a_checkpoint_incomplete_not_a_crash(tmp_path):
    """A commit marker or manifest left empty, cut short or without its keys by a crash (a rename
    without fsync) is named and skipped: the run resumes from the previous complete checkpoint, and
    pruning after the next save goes past it."""
    import torch

    from hierdino.train import checkpoint

    model = torch.nn.Linear(3, 2)
    mgr = checkpoint.CheckpointManager(model, torch.optim.AdamW(model.parameters()), 0, 1, str(tmp_path / "run"), keep=3)
    for step in (2, 4):
        mgr.save(step, {"images_seen": 0})
    ckpt = tmp_path / "run" / "checkpoint_0000004"
    marker, manifest = (ckpt / COMMIT).read_text(), (ckpt / "manifest_rank0.json").read_text()
    for name, text, why in ((COMMIT, "", "COMMITTED.json is unreadable (JSONDecodeError"),
                            (COMMIT, '{"step": 4}', "COMMITTED.json is unreadable (KeyError"),
                            (COMMIT, '{"world": "1"}', "COMMITTED.json is unreadable ('world' is '1')"),
                            (COMMIT, '{"world": 0}', "COMMITTED.json is unreadable ('world' is 0)"),
                            ("manifest_rank0.json", manifest[:20], "manifest_rank0.json is unreadable (JSONDecodeError"),
                            ("manifest_rank0.json", "[1, 2]", "manifest_rank0.json is unreadable (TypeError")):
        (ckpt / COMMIT).write_text(marker)
        (ckpt / "manifest_rank0.json").write_text(manifest)
        (ckpt / name).write_text(text)
        found = latest_complete(str(tmp_path / "run"))
        assert found.step == 2 and found.skipped[0].startswith(f"checkpoint_0000004: {why}"), (name, text, found)
    assert mgr.load()["step"] == 2
    mgr.save(6, {"images_seen": 0})  # prunes past the torn one
    assert latest_complete(str(tmp_path / "run")).step == 6



def test_checksums_that_do_not_fit_their_file_make_a_checkpoint_incomplete(tmp_path):
    """A manifest whose block checksums are too few or not numbers (an edit, a bug elsewhere) is named
    and skipped, not trusted: a restore could not check those bytes."""
    import torch

    from hierdino.train import checkpoint

    model = torch.nn.Linear(3, 2)
    mgr = checkpoint.CheckpointManager(model, torch.optim.AdamW(model.parameters()), 0, 1, str(tmp_path / "run"), keep=3)
    for step in (2, 4):
        mgr.save(step, {"images_seen": 0})
    path = tmp_path / "run" / "checkpoint_0000004" / "manifest_rank0.json"
    good = json.loads(path.read_text())
    for crcs in ([], ["00ff00ff"]):
        path.write_text(json.dumps(dict(good, crc32=dict(good["crc32"], **{"__0_0.distcp": crcs}))))
        assert verify(str(path.parent)) == "manifest_rank0.json is unreadable (the checksums of __0_0.distcp do not fit its " \
            f"{good['files']['__0_0.distcp']} bytes)"
        assert mgr.load()["step"] == 2

def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_bytes_changed_after_the_commit_are_caught_and_the_previous_checkpoint_restored(tmp_path, monkeypatch, said):
    """A shard or train state with one bit flipped (same size, so the commit check passes) is found by
    its block checksum on restore, named with the bytes that differ, marked, and the previous
    checkpoint restored exactly; pruning keeps the marked one; a manifest without checksums (written
    before them) still restores."""
    import torch

    from hierdino.train import checkpoint

    monkeypatch.setattr(checkpoint.dcp_storage, "CRC_BLOCK", 4096)
    model = torch.nn.Linear(64, 64)
    mgr = checkpoint.CheckpointManager(model, torch.optim.AdamW(model.parameters()), 0, 1, str(tmp_path / "run"), keep=3)
    weights = {}
    for step in (2, 4, 6):
        with torch.no_grad():
            model.weight.fill_(step)
        weights[step] = model.weight.detach().clone()
        mgr.save(step, {"images_seen": step})
    run = tmp_path / "run"
    shard = run / "checkpoint_0000006" / "__0_0.distcp"
    offset = shard.stat().st_size // 2
    _flip(shard, offset)
    assert verify(str(run / "checkpoint_0000006")) is None  # sizes alone cannot tell

    assert mgr.load()["step"] == 4
    assert torch.equal(model.weight, weights[4])
    start = offset // 4096 * 4096
    assert said[0].startswith(f"[hierdino] skipped checkpoint_0000006: corrupt: {run}/checkpoint_0000006/__0_0.distcp: "
                              f"bytes {start}-{min(start + 4095, shard.stat().st_size - 1)} differ"), said
    assert latest_complete(str(run)).skipped == [
        f"checkpoint_0000006: marked corrupt by an earlier restore (kept for inspection until the run saves that step "
        f"again): {said[0].split('corrupt: ', 1)[1]}"]

    for step in (8, 10):  # keep=3 complete ones; the corrupt one stays for a person to look at
        mgr.save(step, {"images_seen": step})
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint_")) == [
        "checkpoint_0000004", "checkpoint_0000006", "checkpoint_0000008", "checkpoint_0000010"]

    _flip(run / "checkpoint_0000010" / "train_state_rank0.pt", 100)
    said.clear()
    assert mgr.load()["step"] == 8 and "train_state_rank0.pt: bytes 0-" in said[0], said

    manifest = run / "checkpoint_0000004" / "manifest_rank0.json"  # as written before checksums
    old = json.loads(manifest.read_text())
    del old["crc32"], old["crc_block"]
    manifest.write_text(json.dumps(old))
    for step in (8, 10):
        (run / f"checkpoint_{step:07d}" / CORRUPT).write_text('{"why": "test"}')
    assert mgr.load()["step"] == 4 and torch.equal(model.weight, weights[4])


def test_a_checkpoint_that_cannot_be_written_stops_the_run_naming_why_and_the_last_complete_one(tmp_path):
    """A real write failure inside DCP's save (the process's file-size limit, which fails writes as
    a full disk does) stops the save with a storage error naming the checkpoint, the OS error and the
    last complete checkpoint; the partial checkpoint is removed (it would hold the space a retry
    needs); the previous one still restores."""
    import resource
    import signal

    import torch

    from hierdino.train import checkpoint

    run = tmp_path / "run"
    model = torch.nn.Linear(256, 256)  # a shard of about 0.8 MB with its Adam moments
    model(torch.ones(1, 256)).sum().backward()
    opt = torch.optim.AdamW(model.parameters())
    opt.step()
    mgr = checkpoint.CheckpointManager(model, opt, 0, 1, str(run), keep=3)
    mgr.save(2, {"images_seen": 2})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    before = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        with pytest.raises(storage.StorageError) as err:
            mgr.save(4, {"images_seen": 4})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, before)
    # torch's zip writer reports the short write as "unexpected pos ..." (a full disk gives ENOSPC, and
    # the advice to free space)
    assert re.fullmatch(f"cannot write checkpoint {run}/checkpoint_0000004: .+; the partial checkpoint was removed; "
                        f"the last complete checkpoint is {run}/checkpoint_0000002. Run the same command to resume "
                        "once it can be written.", str(err.value)), str(err.value)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_0000002"]
    assert mgr.load()["step"] == 2
