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


# The start-up check of the labelled rows a mix gives the supervised loss (``labelled_rows_warning``).
# The supervised term is a mean over a worker's labelled rows, so its scale does not depend on how
# many there are; what starves it is a worker batch that holds none (that worker's term is then
# zero). Each worker cuts its own batches with ``MixSchedule``, which spreads a dataset's rows evenly
# over the steps: with 1 labelled row expected per worker batch every worker step can hold a label;
# with r < 1, at least a share 1 - r of the worker steps holds none (60% at the 0.4 rows of 240,000
# unlabelled images beside 3,000 labelled at batch 32). The floor is in rows, not a share of the
# batch: 1% of a 4,096-image batch is 41 labelled rows a step, plenty, while 3% of 16 is none.
LABELLED_ROWS_FLOOR = 1.0
# What the suggested ``data.weights`` aim at: 4 expected labelled rows per worker batch (a margin
# over the floor, for labelled sets that hold unlabelled rows too), at most half of the batch (the
# other half stays self-supervised only), and never below the floor.
SUGGESTED_LABELLED_ROWS = 4.0
SUGGESTED_MAX_SHARE = 0.5


def expected_labelled_rows(proportions: Sequence[float], sizes: Sequence[int], labelled: Sequence[int],
                           batch_size: int) -> float:
    """Labelled rows expected in a batch: ``batch_size x sum_d p_d x labelled_d / size_d``.

    ``sizes`` and ``labelled``: each dataset's train-split rows and how many of them have a label.
    """
    return batch_size * sum(p * lab / n for p, lab, n in zip(proportions, labelled, sizes) if n > 0)


def weights_for_labelled_share(proportions: Sequence[float], sizes: Sequence[int], labelled: Sequence[int],
                               share: float) -> list[float]:
    """Mix proportions that give labelled rows an expected ``share`` of each batch.

    The datasets with labels together take ``share / f`` of the batch, where ``f`` is the labelled
    share of their rows under the current proportions (capped at all of it), among themselves in
    their current proportions (by size if those are all 0); the datasets without labels share the
    rest in theirs. Where the labelled datasets hold unlabelled rows too, the cap can leave the
    labelled share below ``share``.
    """
    has = [lab > 0 for lab in labelled]
    inner = [p if h else 0.0 for p, h in zip(proportions, has)]
    if sum(inner) <= 0:
        inner = [float(n) if h else 0.0 for n, h in zip(sizes, has)]
    inner = [w / sum(inner) for w in inner]
    f = sum(w * lab / n for w, lab, n in zip(inner, labelled, sizes) if w > 0)
    if f <= 0:
        raise ValueError("weights_for_labelled_share: no dataset has labelled rows")
    rest = [0.0 if h else p for p, h in zip(proportions, has)]
    if sum(rest) <= 0:  # nothing without labels to take rows from
        return inner
    group = min(1.0, share / f)
    return [w * group + r / sum(rest) * (1 - group) for w, r in zip(inner, rest)]


def labelled_rows_warning(sizes: Sequence[int], labelled: Sequence[int], proportions: Sequence[float],
                          per_worker_batch: int) -> str | None:
    """One or two lines when a worker's batch is expected to hold fewer than ``LABELLED_ROWS_FLOOR``
    labelled rows (None otherwise), naming the ``data.weights`` that would restore them.

    For a run whose supervised loss is on: a large unlabelled pool beside small labelled sets, mixed
    by size (``data.weights`` null), leaves the supervised loss almost never a label.
    """
    rows = expected_labelled_rows(proportions, sizes, labelled, per_worker_batch)
    if rows >= LABELLED_ROWS_FLOOR:
        return None
    if sum(labelled) == 0:
        return ("no training dataset has labelled train rows: the supervised loss never sees a label "
                "(loss.supervised.kind=none turns it off)")
    head = (f"the data mix gives {rows:.2f} labelled rows per batch of {per_worker_batch} per worker "
            f"({100 * rows / per_worker_batch:.2f}%), under the floor of {LABELLED_ROWS_FLOOR:g}: the supervised "
            "loss rarely sees a label")
    target = max(LABELLED_ROWS_FLOOR, min(SUGGESTED_LABELLED_ROWS, SUGGESTED_MAX_SHARE * per_worker_batch))
    weights = [float(f"{w:.3g}") for w in weights_for_labelled_share(proportions, sizes, labelled,
                                                                     min(1.0, target / per_worker_batch))]
    after = expected_labelled_rows(mix_proportions(sizes, weights), sizes, labelled, per_worker_batch)
    return (head + f".\n  --set data.weights=[{','.join(f'{w:g}' for w in weights)}] (data.train order) gives "
            f"{after:.1f} labelled rows per worker batch ({100 * after / per_worker_batch:.1f}%)")


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
