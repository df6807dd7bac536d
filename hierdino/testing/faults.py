"""Test-only faults, injected into Ray workers from outside the library code.

``hierdino.runtime.init_ray`` hands every ``HIERDINO_TEST_*`` variable of the driver's environment to
the workers with ``install`` as their ``worker_process_setup_hook``; nothing else reads them. Each
patches one method of the trainer in that worker process:

- ``HIERDINO_TEST_KILL_IN_CHECKPOINT=<step>``: SIGKILL (as the OOM killer or a node loss) once this
  rank's files of that step's checkpoint are written, before its manifest; once per
  ``HIERDINO_TEST_KILL_IN_CHECKPOINT_DIR`` (a marker file there says it happened).
- ``HIERDINO_TEST_PAUSE_BEFORE_CHECKPOINT=<step>``: as that step's checkpoint begins, touch
  ``<DIR>/HIERDINO_TEST_PAUSE_BEFORE_CHECKPOINT.<step>.reached`` and wait (at most 10 min) for
  ``....go``, so that a test acts exactly then (an object-store outage), with no timing window.
- ``HIERDINO_TEST_NAN_AT_STEP=<step>``: that step's loss and DINO term are NaN (steps counted from 1,
  as the progress line counts them).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

KILL, PAUSE, NAN = "HIERDINO_TEST_KILL_IN_CHECKPOINT", "HIERDINO_TEST_PAUSE_BEFORE_CHECKPOINT", "HIERDINO_TEST_NAN_AT_STEP"


def install() -> None:
    env = os.environ
    if KILL in env or PAUSE in env:
        from hierdino.train.checkpoint import CheckpointManager  # torch: only when a test asks for a fault

        if KILL in env:
            CheckpointManager._write = _kill_after(CheckpointManager._write, int(env[KILL]), env[f"{KILL}_DIR"])
        if PAUSE in env:
            CheckpointManager.save = _pause_before(CheckpointManager.save, int(env[PAUSE]), env[f"{PAUSE}_DIR"])
    if NAN in env:
        from hierdino.train.loop import TrainStep  # as above

        TrainStep.__call__ = _nan_at(TrainStep.__call__, int(env[NAN]))


def _kill_after(write, at: int, marker_dir: str):
    @functools.wraps(write)
    def wrapper(self, uri, step, *args, **kwargs):
        out = write(self, uri, step, *args, **kwargs)
        marker = Path(marker_dir) / f"{KILL}.{step}.done"
        if step == at and not marker.exists():
            marker.touch()
            os.sync()  # the marker is on disk before the kill
            os.kill(os.getpid(), 9)
        return out
    return wrapper


def _pause_before(save, at: int, marker_dir: str):
    @functools.wraps(save)
    def wrapper(self, step, *args, **kwargs):
        if step == at:
            base = os.path.join(marker_dir, f"{PAUSE}.{step}")
            Path(base + ".reached").touch()
            deadline = time.monotonic() + 600
            while not os.path.exists(base + ".go") and time.monotonic() < deadline:
                time.sleep(0.05)
        return save(self, step, *args, **kwargs)
    return wrapper


def _nan_at(call, at: int):
    @functools.wraps(call)
    def wrapper(self, batch, step, *args, **kwargs):
        if step + 1 != at:
            return call(self, batch, step, *args, **kwargs)
        losses = self.model.losses

        def poisoned(*a, **kw):
            loss, terms, stats = losses(*a, **kw)
            return loss * float("nan"), dict(terms, dino=terms["dino"] * float("nan")), stats
        self.model.losses = poisoned
        try:
            return call(self, batch, step, *args, **kwargs)
        finally:
            del self.model.losses
    return wrapper
