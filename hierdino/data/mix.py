"""Row-level mixing of several training datasets into every batch, in fixed proportions.

Each dataset arrives as its own stream of rows (one Ray Data pipeline per dataset, see
``hierdino.data.ingest``); ``MixSchedule`` says how many rows of each dataset step ``n`` takes, and
``MixedBatches`` cuts the streams into those batches. The counts follow error diffusion: dataset k
is owed ``p_k * B`` rows per step; each step gives every dataset the whole rows it is owed, then the
rows left over go to the largest remainders. So every batch holds ``floor(p_k B)`` or
``ceil(p_k B)`` rows of dataset k, and after n steps each dataset has had its share of ``n B`` rows
to within one row. The schedule depends only on the step, which is how a resumed run knows how many
rows of each dataset it has already consumed.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np


def mix_proportions(sizes: Sequence[int], weights: Sequence[float] | None = None) -> list[float]:
    """Share of each dataset in a batch: ``weights`` normalised, or proportional to ``sizes``."""
    raw = [float(n) for n in sizes] if weights is None else [float(w) for w in weights]
    if len(raw) != len(sizes):
        raise ValueError(f"data.weights: {list(weights)} needs one weight per dataset ({len(sizes)})")
    if any(not math.isfinite(w) or w < 0 for w in raw) or sum(raw) <= 0:
        raise ValueError(f"data.weights must be finite, >= 0 and not all 0, got {list(raw)}")
    total = sum(raw)
    return [w / total for w in raw]


class MixSchedule:
    """Rows per dataset for each step of batch size ``batch_size`` (deterministic, step-indexed)."""

    def __init__(self, proportions: Sequence[float], batch_size: int):
        self.p = np.asarray(proportions, dtype=np.float64)
        self.batch_size = batch_size
        self._owed = np.zeros_like(self.p)
        self._next = 0  # the step whose counts _owed is ready for
        self._cum = np.zeros(len(self.p), dtype=np.int64)

    def _advance(self) -> np.ndarray:
        owed = self._owed + self.p * self.batch_size
        counts = np.floor(owed + 1e-9).astype(np.int64)
        left = self.batch_size - int(counts.sum())
        if left > 0:  # largest remainders first; ties to the lower index
            order = np.argsort(-(owed - counts), kind="stable")
            counts[order[:left]] += 1
        self._owed = owed - counts
        self._next += 1
        self._cum += counts
        return counts

    def _rewind_to(self, step: int) -> None:
        if step < self._next:
            self._owed[:] = 0
            self._cum[:] = 0
            self._next = 0
        while self._next < step:
            self._advance()

    def counts(self, step: int) -> np.ndarray:
        """Rows of each dataset in the batch of ``step`` (they sum to ``batch_size``)."""
        self._rewind_to(step)
        return self._advance()

    def consumed(self, steps: int) -> np.ndarray:
        """Rows of each dataset taken by steps ``0 .. steps - 1``."""
        self._rewind_to(steps)
        return self._cum.copy()


class MixedBatches:
    """Batches of ``schedule.batch_size`` rows cut from one numpy-batch stream per dataset.

    ``streams[k]`` yields dicts of equal-length arrays (the ingest's columns); batch ``n`` (from
    ``start_step``) takes ``schedule.counts(n)[k]`` rows of stream k, in stream order, datasets
    concatenated. Iteration ends when a stream that is owed rows runs out.

    Streams that begin at an earlier step ``streams_start`` (a worker restarted by Ray Train after a
    checkpoint newer than the one the run was launched from: the driver's streams begin at the
    launch) first drop the rows steps ``streams_start .. start_step - 1`` took, so the restarted
    worker goes on with the rows the interrupted one had not trained on.
    """

    def __init__(self, streams: Sequence[Iterator[dict]], schedule: MixSchedule, start_step: int = 0,
                 streams_start: int | None = None):
        self.streams = [iter(s) for s in streams]
        self.schedule, self.step = schedule, start_step
        self.pending: list[list[dict]] = [[] for _ in streams]
        self.available = [0] * len(self.streams)
        begun = start_step if streams_start is None else streams_start
        self.skip = (schedule.consumed(start_step) - schedule.consumed(begun)).tolist()

    def _take(self, k: int, n: int) -> dict | None:
        while self.available[k] < n:
            try:
                chunk = next(self.streams[k])
            except StopIteration:
                return None
            self.pending[k].append(chunk)
            self.available[k] += len(next(iter(chunk.values())))
        joined = {c: np.concatenate([p[c] for p in self.pending[k]]) for c in self.pending[k][0]}
        head = {c: v[:n] for c, v in joined.items()}
        rest = {c: v[n:] for c, v in joined.items()}
        self.available[k] -= n
        self.pending[k] = [rest] if self.available[k] else []
        return head

    def __iter__(self):
        return self

    def _drop(self, k: int, n: int) -> bool:
        """Discard the next ``n`` rows of stream k, taking what is pending (or one new row, which reads a
        chunk) at a time: no more than a chunk in memory."""
        while n > 0:
            m = min(n, max(self.available[k], 1))
            if self._take(k, m) is None:
                return False
            n -= m
        return True

    def __next__(self) -> dict:
        for k, n in enumerate(self.skip):
            if n > 0 and not self._drop(k, int(n)):
                raise StopIteration
        self.skip = [0] * len(self.streams)
        counts = self.schedule.counts(self.step)
        parts = []
        for k, n in enumerate(counts):
            if n == 0:
                continue
            part = self._take(k, int(n))
            if part is None:
                raise StopIteration
            part["source"] = np.full(int(n), k, np.int64)
            parts.append(part)
        self.step += 1
        return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
