"""A run's metrics record: ``metrics.jsonl`` and TensorBoard event files in the run directory.

``RunLog(run_uri)`` keeps both, on local disk or S3:

- ``metrics.jsonl``: one JSON record per log step. Local files are appended line by line; S3 has no
  append, so records are buffered and the file is written at ``flush()`` (each checkpoint and the end).
- ``tb/``: TensorBoard event files (``tensorboard --logdir runs/`` or ``--logdir s3://…/runs``), every
  numeric scalar under a group: ``loss/``, ``collapse/``, ``schedule/``, ``grad/``, ``speed/``,
  ``eval/``. On S3 the event file is written to a local temporary directory and uploaded at ``flush()``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

from tensorboardX import SummaryWriter

from hierdino import storage

GROUPS = {
    "loss": ("loss", "dino", "ibot", "koleo", "sup"),
    "collapse": ("dino_entropy", "ibot_entropy", "distinct_protos", "cls_spread", "labelled"),
    "schedule": ("lr", "wd", "momentum", "teacher_temp"),
    "speed": ("images_per_s", "data_wait", "first_batch_s"),
}


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a metric key: ``dino`` -> ``loss/dino``, ``ext_val_bacc`` -> ``eval/ext_val_bacc``."""
    for group, keys in GROUPS.items():
        if key in keys:
            return f"{group}/{key}"
    if key.startswith("grad_norm_"):
        return f"grad/{key.removeprefix('grad_norm_')}"
    if "bacc" in key or key.startswith("ext_"):
        return f"eval/{key}"
    return f"other/{key}"


class RunLog:
    """Rank 0's metrics of a run (``enabled=False`` on other ranks: every call is a no-op)."""

    def __init__(self, run_uri: str, enabled: bool = True, tb_subdir: str = "tb", jsonl: bool = True,
                 options: storage.StorageOptions | None = None):
        self.enabled, self.jsonl, self.options = enabled, jsonl, options
        self.uri = storage.join(run_uri, "metrics.jsonl")
        self.remote = storage.is_s3(run_uri)
        self.tb_uri = storage.join(run_uri, tb_subdir)
        self.lines: list[str] = []
        self.writer = None
        if not enabled:
            return
        if jsonl and self.remote and storage.exists(self.uri, options):  # a resumed run keeps its earlier records
            self.lines = storage.read_bytes(self.uri, options).decode().splitlines()

        self.tb_local = tempfile.mkdtemp(prefix="hierdino-tb-") if self.remote else self.tb_uri
        if not self.remote:
            os.makedirs(self.tb_local, exist_ok=True)
        self.writer = self._new_writer()

    def _new_writer(self, purge_step: int | None = None) -> SummaryWriter:
        # One file per writer, named in time order: tensorboardX names files by the second (a resumed
        # run must not overwrite the last file) and TensorBoard reads a directory's files in name order.
        return SummaryWriter(logdir=self.tb_local, flush_secs=30, purge_step=purge_step,
                             filename_suffix=f".{time.time_ns():020d}.{os.getpid()}")

    def resume_at(self, step: int) -> None:
        """Forget what an interrupted attempt logged after ``step`` (the checkpoint this run continues
        from), so the steps it logs again appear once: ``metrics.jsonl`` keeps its records up to
        ``step``, and TensorBoard is told to drop later events of earlier files (``purge_step``)."""
        if not self.enabled:
            return

        def kept(lines: list[str]) -> list[str]:
            out = []
            for ln in lines:
                try:
                    if json.loads(ln).get("step", 0) <= step:
                        out.append(ln)
                except ValueError:  # blank, or torn by a writer killed mid-line
                    pass
            return out
        if self.jsonl and self.remote:
            self.lines = kept(self.lines)
        elif self.jsonl and os.path.exists(self.uri):
            with open(self.uri) as f:
                lines = f.read().splitlines()
            keep = kept(lines)
            if len(keep) != len(lines):
                storage.write_bytes(self.uri, "".join(ln + "\n" for ln in keep).encode())
        self.writer.close()
        self.writer = self._new_writer(purge_step=step + 1)

    def write(self, record: dict, step: int | None = None) -> None:
        """One record: a ``metrics.jsonl`` line and a TensorBoard scalar per finite number in it."""
        if not self.enabled:
            return
        step = int(record.get("step", 0) if step is None else step)
        line = json.dumps(record)
        if self.jsonl and self.remote:
            self.lines.append(line)
        elif self.jsonl:
            with open(self.uri, "a") as f:
                f.write(line + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(scalar_tag(key), float(value), step)

    def flush(self) -> None:
        """Make everything written so far durable in the run directory (called at checkpoints and the end)."""
        if not self.enabled:
            return
        self.writer.flush()
        self._upload()

    def _upload(self) -> None:
        if not self.remote:
            return
        if self.jsonl:
            storage.write_bytes(self.uri, ("\n".join(self.lines) + "\n").encode(), self.options)
        for name in os.listdir(self.tb_local):
            with open(os.path.join(self.tb_local, name), "rb") as f:
                storage.write_bytes(storage.join(self.tb_uri, name), f.read(), self.options)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self._upload()
            self.enabled = False
