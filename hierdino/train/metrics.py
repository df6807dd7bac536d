"""What a worker measures and says about its run: data wait, throughput, time to first batch,
corrupt images, the collapse watch, the metrics record (``RunLog``) and the progress line.

``TrainMetrics`` is used by ``hierdino.train.loop``: ``next_batch`` around the ingest, ``log_step``
at each log step, ``flush`` at checkpoints and ``close`` at the end. Only rank 0 logs and writes.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from hierdino.config import Config
from hierdino.data.ingest import CorruptCounter
from hierdino.eval import OBJECTIVE
from hierdino.logs import PLAIN
from hierdino.losses.collapse import CollapseWatch
from hierdino.storage import StorageOptions
from hierdino.train.tracking import RunLog

logger = logging.getLogger(__name__)

LINE_TERMS = ("dino", "ibot", "koleo", "sup", OBJECTIVE)  # loss terms (and the live score) on the progress line


def as_tensors(batch: dict) -> dict:
    """A NumPy batch from the ingest -> host tensors (object columns, such as encoded images, kept as they are)."""
    return {k: v if v.dtype == object else torch.from_numpy(v) for k, v in batch.items()}


def collapse_line(rec: dict) -> str:
    """The collapse monitor on the progress line: target entropies / ln K, distinct argmaxes, CLS spread, labelled share."""
    return (f"H/lnK dino {rec['dino_entropy']:.2f} ibot {rec['ibot_entropy']:.2f} | protos {int(rec['distinct_protos'])} | "
            f"spread {rec['cls_spread']:.2f} | labelled {100 * rec['labelled']:.0f}%")


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class TrainMetrics:
    """Counters since the loop started (``worker_start``: when the worker process began, for the
    time to first batch) and the outputs of rank 0."""

    def __init__(self, cfg: Config, run_uri: str, rank: int, worker_start: float, options: StorageOptions | None = None):
        self.cfg, self.rank, self.worker_start = cfg, rank, worker_start
        self.log = RunLog(run_uri, rank == 0, options=options)
        self.watch = CollapseWatch(max(cfg.optim.warmup_steps, cfg.loss.warmup_teacher_temp_steps,
                                       cfg.optim.freeze_last_layer_steps), stop=cfg.train.stop_on_collapse)
        self.corrupt = CorruptCounter(cfg.data.max_corrupt_fraction)
        self.t0, self.wait, self.images, self.first_batch_s = time.perf_counter(), 0.0, 0, None
        self.first_batch_warn_s = 120.0  # while the first batch is awaited, what the cluster has free is said this often

    def begin(self) -> None:
        """The loop starts now: throughput and data wait are measured from here."""
        self.t0, self.wait, self.images = time.perf_counter(), 0.0, 0

    def say(self, text: str, level: int = logging.INFO, **kw) -> None:
        """Log ``text`` on rank 0 (the other ranks would repeat it)."""
        if self.rank == 0:
            logger.log(level, text, **kw)

    def next_batch(self, batches, step: int, per_worker: int, decode=None) -> dict[str, torch.Tensor]:
        """The next batch as tensors (host tensors, or what ``decode`` makes of them: the device decoder
        of ``data.decode: device``, whose time counts as waiting for data); the first one is announced."""
        tw = time.perf_counter()
        done = None
        if self.first_batch_s is None:  # a first batch that never comes is said, not waited for in silence
            done = threading.Event()
            threading.Thread(target=self._while_no_batch, args=(done,), daemon=True).start()
        try:
            raw = as_tensors(next(batches))
        except StopIteration:
            raise RuntimeError(f"the training data ran out at step {step}: a stream yielded fewer rows than the "
                               f"mix schedule needs (per-worker batch {per_worker})") from None
        finally:
            if done is not None:
                done.set()
        if decode is not None:
            raw = decode(raw)
        self.wait += time.perf_counter() - tw
        if self.first_batch_s is None:  # from worker start: model build, checkpoint load and the ingest's start-up
            self.first_batch_s = time.perf_counter() - self.worker_start
            self.say(f"first batch {self.first_batch_s:.1f} s after the worker started")
        self.corrupt.update(raw["ok"].numpy())
        self.images += self.cfg.train.batch_size
        return raw

    def _while_no_batch(self, done: threading.Event) -> None:
        import ray  # the worker's Ray: what the cluster has free now

        while not done.wait(self.first_batch_warn_s):
            free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU", 0.0)
            self.say(f"no batch yet {time.perf_counter() - self.worker_start:.0f} s after the worker started: "
                     f"the data ingest has not delivered. The cluster has {free:g} of {total:g} CPUs free, and each ingest "
                     f"task needs data.num_cpus_per_map={self.cfg.data.num_cpus_per_map:g}: with none free, other work "
                     "holds them (another job, a leaked placement group); with some, large first files take long",
                     logging.WARNING)

    def images_per_s(self) -> float:
        return self.images / max(time.perf_counter() - self.t0, 1e-9)

    def log_step(self, step: int, stop: int, last: dict) -> None:
        """A log step: the collapse watch, one ``metrics.jsonl`` record and (rank 0) one progress line."""
        warning = self.watch.observe(step, last["dino_entropy"])
        if warning:
            self.say(f"WARNING: {warning}", logging.WARNING)
        elapsed = time.perf_counter() - self.t0
        rate = self.images / max(elapsed, 1e-9)
        rec = dict(last, step=step, images_per_s=rate, data_wait=self.wait / max(elapsed, 1e-9),
                   corrupt=self.corrupt.corrupt, first_batch_s=self.first_batch_s)
        self.log.write(rec)
        eta = (stop - step) * self.cfg.train.batch_size / max(rate, 1e-9)
        terms = " ".join(f"{k} {last[k]:.3f}" for k in LINE_TERMS if k in last)
        self.say(f"step {step}/{self.cfg.train.steps} | loss {last['loss']:.3f} ({terms}) | {collapse_line(last)} | "
                 f"lr {last['lr']:.2e} | {rate:.1f} img/s | data-wait {100 * rec['data_wait']:.0f}% | "
                 f"ETA {fmt_duration(eta)}", extra=PLAIN)

    def flush(self) -> None:
        self.log.flush()

    def close(self) -> None:
        self.log.close()
