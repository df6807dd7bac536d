"""Run tracking (issue #14): metrics.jsonl appended, TensorBoard event files on local disk and S3,
read back with TensorBoard's own event reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hierdino.train.tracking import RunLog, scalar_tag


def _records():
    return [{"step": s, "loss": 5.0 - s, "dino": 4.0 - s / 2, "dino_entropy": 0.9 - s / 10, "lr": 1e-3 * s,
             "grad_norm_backbone": 2.0, "ext_val_bacc": 0.5 + s / 100, "note": "text is kept in jsonl only",
             "bad": float("nan")} for s in (1, 2, 3)]


def _scalars(logdir):
    acc = EventAccumulator(str(logdir)).Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tags_group_the_metrics():
    assert [scalar_tag(k) for k in ("sup", "cls_spread", "teacher_temp", "grad_norm_dino_head", "ext_val_bacc", "x")] == \
        ["loss/sup", "collapse/cls_spread", "schedule/teacher_temp", "grad/dino_head", "eval/ext_val_bacc", "other/x"]


def test_local_run_appends_jsonl_and_writes_event_files(tmp_path):
    log = RunLog(str(tmp_path))
    for r in _records()[:2]:
        log.write(r)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # on disk at once, no flush needed
    log.close()
    again = RunLog(str(tmp_path))  # a resumed run appends after the earlier lines
    again.write(_records()[2])
    again.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and lines[0]["note"].startswith("text")
    sc = _scalars(tmp_path / "tb")
    assert sc["loss/dino"] == [(1, 3.5), (2, 3.0), (3, 2.5)]
    assert sc["schedule/lr"] == [(s, pytest.approx(1e-3 * s)) for s in (1, 2, 3)]
    assert "other/bad" not in sc and "other/note" not in sc  # non-finite and non-numeric values are not plotted


def test_s3_run_buffers_until_flush_and_uploads_event_files(s3_server, tmp_path, monkeypatch):
    from hierdino import storage

    s3_server.create_bucket("tracking")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    run = "s3://tracking/runs/r1"
    log = RunLog(run)
    for r in _records()[:2]:
        log.write(r)
    assert not storage.exists(f"{run}/metrics.jsonl")  # buffered: S3 has no append
    log.flush()
    assert len(storage.read_bytes(f"{run}/metrics.jsonl").decode().splitlines()) == 2
    log.close()
    resumed = RunLog(run)
    resumed.write(_records()[2])
    resumed.close()
    assert [json.loads(x)["step"] for x in storage.read_bytes(f"{run}/metrics.jsonl").decode().splitlines()] == [1, 2, 3]
    files = storage.list_files(f"{run}/tb")
    assert len(files) == 2  # one event file per writer (per driver or resumed run), as TensorBoard expects
    for f in files:
        (tmp_path / f.rsplit("/", 1)[-1]).write_bytes(storage.read_bytes(f if f.startswith("s3://") else "s3://" + f))
    assert sorted(_scalars(tmp_path)["eval/ext_val_bacc"]) == [(1, pytest.approx(0.51)), (2, pytest.approx(0.52)),
                                                                (3, pytest.approx(0.53))]


def test_a_resumed_run_logs_each_step_once_in_jsonl_and_tensorboard(tmp_path):
    """An attempt logged steps 1-3 and was killed (its last line torn) after the checkpoint at step 2:
    the resumed run logs 3 again, and both records show step 3 once, with the resumed value."""
    first = RunLog(str(tmp_path))
    for r in _records():
        first.write(r)
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a writer killed mid-line
    again = RunLog(str(tmp_path))
    again.resume_at(2)
    again.write({**_records()[2], "dino": 9.0})
    again.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["dino"]) for x in lines] == [(1, 3.5), (2, 3.0), (3, 9.0)]
    assert _scalars(tmp_path / "tb")["loss/dino"] == [(1, 3.5), (2, 3.0), (3, 9.0)]  # the first attempt's 3 purged


def test_a_worker_that_cannot_see_the_run_directory_stops_naming_it(tmp_path):
    from hierdino.train.loop import check_shared_run_dir

    with pytest.raises(RuntimeError, match=r"run directory .*/r is not visible from node .* run.storage must be shared"):
        check_shared_run_dir(str(tmp_path / "r"), None)  # what a worker on another node, with its own disk, sees
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("{}")  # what the driver writes before the workers start
    check_shared_run_dir(str(tmp_path / "r"), None)


def test_a_first_batch_that_does_not_come_is_said_with_the_free_cpus(ray_cluster, tmp_path, said, monkeypatch):
    """While the first batch is awaited longer than ``first_batch_warn_s``, rank 0 says so with the
    cluster's free CPUs (the session cluster's 2 here); once it came, nothing more is said.
    Driven by events, not sleeps: the batch comes only after the second warning was said, and the
    watcher thread must have ended once the batch came (joined: nothing can be said after that)."""
    import threading
    import time as _time
    import types

    from hierdino.config import load_config
    from hierdino.train import metrics as metrics_mod
    from hierdino.train.metrics import TrainMetrics

    watchers = []

    class RecordedThread(threading.Thread):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            watchers.append(self)

    # only metrics.py's view of the threading module: Ray's own threads stay untouched
    monkeypatch.setattr(metrics_mod, "threading", types.SimpleNamespace(Thread=RecordedThread, Event=threading.Event))
    metrics = TrainMetrics(load_config("tiny-cpu"), str(tmp_path), 0, _time.perf_counter())
    metrics.first_batch_warn_s = 0.05
    warned_twice = threading.Event()
    lines = []
    say = metrics.say

    def recording_say(text, *args, **kwargs):
        say(text, *args, **kwargs)
        lines.append(text)
        if sum("no batch yet" in x for x in lines) >= 2:
            warned_twice.set()

    metrics.say = recording_say

    def gated():
        assert warned_twice.wait(30), "no second 'no batch yet' line while the first batch was held back"
        yield {"ok": np.ones(2, dtype=bool)}
        yield {"ok": np.ones(2, dtype=bool)}

    batches = gated()
    metrics.next_batch(batches, 0, 2)
    [watcher] = watchers
    watcher.join(timeout=30)  # a hang guard: it ends as soon as the batch came
    assert not watcher.is_alive()
    first = "\n".join(said)
    said.clear()
    warnings = [x for x in lines if "no batch yet" in x]
    assert len(warnings) >= 2 and all("of 2 CPUs free" in x and "num_cpus_per_map=0.5" in x for x in warnings), lines
    assert first.count("no batch yet") == len(warnings)  # logged by rank 0
    came = next(i for i, x in enumerate(lines) if x.startswith("first batch "))
    assert len(lines) - 1 - came <= 1  # after the batch came, at most the one line in flight as it came
    metrics.next_batch(batches, 1, 2)
    assert len(watchers) == 1  # no new watcher for later batches
    assert not any("no batch yet" in x for x in said)
