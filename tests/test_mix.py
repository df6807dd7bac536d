"""Every batch mixes all training datasets at row level in the configured proportions."""

import re

import numpy as np
import pytest

from hierdino.data.ingest import (
    CropSpec,
    build_train_datasets,
    describe_train_data,
    resume_position,
    stream_name,
)
from hierdino.data.mix import (
    LABELLED_ROWS_FLOOR,
    MixedBatches,
    MixSchedule,
    labelled_rows_warning,
    mix_proportions,
)
from hierdino.data.suite import TRAIN_SETS
from hierdino.hierarchy import load_hierarchy


def test_mix_schedule_counts_by_hand():
    s = MixSchedule([0.5, 0.25, 0.25], 4)
    assert [s.counts(n).tolist() for n in range(3)] == [[2, 1, 1]] * 3
    s = MixSchedule([0.4, 0.3, 0.3], 10)  # owed 4, 3, 3 exactly
    assert s.counts(0).tolist() == [4, 3, 3]
    # B = 32: 12.8, 9.6, 9.6 owed per step; floors, then the leftover rows to the largest remainders
    # (ties to the lower index), the rest carried. By hand: 12.8/9.6/9.6 -> 13,10,9 (carry -.2,-.4,.6);
    # 12.6/9.2/10.2 -> 13,9,10 (-.4,.2,.2); 12.4/9.8/9.8 -> 12,10,10 (.4,-.2,-.2); 13.2/9.4/9.4 ->
    # 13,10,9 (.2,-.6,.4); 13/9/10 -> 13,9,10 (0,0,0): a 5-step cycle taking 64, 48, 48 = 5 * p * 32 rows.
    s = MixSchedule([0.4, 0.3, 0.3], 32)
    cycle = [[13, 10, 9], [13, 9, 10], [12, 10, 10], [13, 10, 9], [13, 9, 10]]
    assert [s.counts(n).tolist() for n in range(30)] == cycle * 6
    assert s.consumed(30).tolist() == [384, 288, 288]
    s = MixSchedule([1 / 3, 1 / 3, 1 / 3], 4)  # 4/3 each: the leftover row rotates
    rows = np.array([s.counts(n) for n in range(3)])
    assert (rows.sum(1) == 4).all() and rows.sum(0).tolist() == [4, 4, 4]
    assert s.consumed(3).tolist() == [4, 4, 4] and s.consumed(0).tolist() == [0, 0, 0]
    assert MixSchedule([1 / 3] * 3, 4).counts(2).tolist() == rows[2].tolist()  # step-indexed, no hidden state


def test_mix_proportions_and_bad_weights():
    assert mix_proportions([1600, 1200, 1200]) == pytest.approx([0.4, 0.3, 0.3])
    assert mix_proportions([1600, 1200, 1200], [2, 1, 1]) == pytest.approx([0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="one weight per dataset"):
        mix_proportions([1, 2], [1.0])
    with pytest.raises(ValueError, match="not all 0"):
        mix_proportions([1, 2], [0, 0])


def test_resume_position_by_hand():
    assert resume_position(0, 1600, 1) == (0, 0)
    assert resume_position(500, 1600, 1) == (1, 0)      # one file partly read: the next epoch
    assert resume_position(500, 1600, 10) == (0, 4)     # 3.125 files read: start at the 5th
    assert resume_position(3200, 1600, 10) == (2, 0)
    assert resume_position(1599, 1600, 10) == (1, 0)


def _batches(data, crops, steps, start=0, batch=32):
    datasets = build_train_datasets(data, crops, batch, 1, start, start + steps, num_cpus=0.5, map_batch_size=32)
    streams = [datasets[stream_name(k)].iter_batches(batch_size=32, batch_format="numpy", local_shuffle_buffer_size=128,
                                                     local_shuffle_seed=k + start) for k in range(len(data.uris))]
    it = MixedBatches(streams, MixSchedule(data.proportions, batch), start_step=start)
    return [next(it) for _ in range(steps)]


def _assert_exact_mix(counts: np.ndarray, proportions, batch: int) -> None:
    """Row counts per batch (steps x datasets) are exact by design: each is floor or ceil of p_k * B,
    every batch is full, and the rows taken by the first n steps stay within one row of n * p_k * B
    (the remainders are carried, never lost), for every n. Checked against the rule, not the schedule."""
    p = np.asarray(proportions, dtype=np.float64)
    owed = p * batch
    assert (counts.sum(1) == batch).all()
    assert ((counts == np.floor(owed + 1e-9)) | (counts == np.ceil(owed - 1e-9))).all(), (counts, owed)
    steps = np.arange(1, len(counts) + 1)[:, None]
    assert (np.abs(np.cumsum(counts, 0) - steps * owed) < 1 + 1e-9).all()


def test_every_batch_mixes_all_datasets_in_proportion(ray_cluster, synth_suite):
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ordered = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # as the trainer's ingest options (launch.ordered_ingest_options)
    try:
        h = load_hierarchy("wbc-h1")
        uris = [f"{synth_suite}/{n}" for n in TRAIN_SETS]  # 1600 fine, 1200 coarse, 1200 unlabelled
        crops = CropSpec(16, (0.32, 1.0), 0, 8, (0.05, 0.32), False, seed=5)
        data = describe_train_data(uris, h, None)
        batches = _batches(data, crops, 30)
        counts = np.array([np.bincount(b["source"], minlength=3) for b in batches])
        assert (counts.sum(1) == 32).all()
        expected = 32 * np.array(data.proportions)
        assert (counts[:, expected >= 4] > 0).all()                     # every dataset in every batch
        _assert_exact_mix(counts, data.proportions, 32)
        labelled = np.array([(b["label"] >= 0).sum() for b in batches])
        assert (labelled > 0).all() and (labelled < 32).all()          # the unlabelled set is in every batch too
        # the source column is right: only the unlabelled set's rows carry -1
        assert all(((b["label"] == -1) == (b["source"] == 2)).all() for b in batches)

        heavy_data = describe_train_data(uris, h, [2.0, 1.0, 1.0])
        heavy = _batches(heavy_data, crops, 30)
        assert heavy_data.proportions[0] == pytest.approx(0.5, abs=1e-3)
        heavy_counts = np.array([np.bincount(b["source"], minlength=3) for b in heavy])
        _assert_exact_mix(heavy_counts, heavy_data.proportions, 32)
        assert heavy_counts[:, 0].tolist() == [16] * 30                       # half of every batch

        again = _batches(data, crops, 30)                               # same seed: the same batches
        assert all(np.array_equal(a["global"], b["global"]) for a, b in zip(batches, again))

        resumed = _batches(data, crops, 2, start=30)                     # goes on, does not restart
        assert not any(np.array_equal(resumed[0]["global"], b["global"]) for b in batches[:2])
    finally:
        ctx.execution_options.preserve_order = ordered


def test_a_worker_restarted_past_the_launch_step_skips_what_it_already_trained_on():
    """Streams that begin at the launch step (3) feeding a worker that resumes at step 7 (Ray Train
    restarted it from a newer checkpoint): its batches are the uninterrupted run's batches 7, 8, ...,
    not a replay of 3, 4, ... (by hand: stream k's rows are numbered, and the schedule's counts say
    which rows each step takes)."""
    def stream(k):  # rows numbered from the launch position, in chunks of 5
        return ({"row": np.arange(i, i + 5) + 1000 * k} for i in range(0, 500, 5))

    def streams():
        return [stream(k) for k in range(3)]

    schedule = MixSchedule([0.5, 0.3, 0.2], 10)
    straight = MixedBatches(streams(), MixSchedule([0.5, 0.3, 0.2], 10), start_step=3)
    uninterrupted = [next(straight)["row"] for _ in range(8)]              # steps 3 .. 10
    restarted = MixedBatches(streams(), schedule, start_step=7, streams_start=3)
    assert all(np.array_equal(next(restarted)["row"], want) for want in uninterrupted[4:])  # steps 7 .. 10
    # by hand for step 7: stream 0 has given 5 rows a step since step 3 (rows 0-19), so it gives 20-24
    first = MixedBatches(streams(), MixSchedule([0.5, 0.3, 0.2], 10), start_step=7, streams_start=3)
    rows = next(first)["row"]
    assert rows[:5].tolist() == [20, 21, 22, 23, 24] and set(rows[5:8]) == {1012, 1013, 1014}


def _train_data(counts: dict[str, tuple[int, int]], weights=None):
    """A ``TrainData`` from manifests built here: name -> (unlabelled, labelled) train images."""
    from hierdino.data.ingest import TrainData
    from hierdino.data.shards import UNLABELED, Manifest

    manifests = {}
    for name, (unlabelled, labelled) in counts.items():
        per_label = {UNLABELED: unlabelled} if unlabelled else {}
        per_label.update({"neutrophil": labelled} if labelled else {})
        manifests[f"/data/{name}"] = Manifest(name, name, unlabelled + labelled, {"train": per_label})
    sizes = [sum(m.counts["train"].values()) for m in manifests.values()]
    labelled = [m.num_labeled("train") for m in manifests.values()]
    return TrainData(list(manifests), manifests, sizes, labelled, mix_proportions(sizes, weights), {})


def _labelled_rows(data, weights, batch: int) -> float:
    """Expected labelled rows of a batch under ``weights``, written out here (not the library's)."""
    total = sum(weights)
    return sum(batch * (w / total) * (lab / n) for w, lab, n in zip(weights, data.labeled, data.sizes))


def test_a_large_unlabelled_pool_warns_with_weights_that_restore_labelled_rows():
    """240,000 unlabelled images beside two labelled sets of 1,500, mixed by size at batch 32: 0.4
    labelled rows a batch. The start warns, naming data.weights; its weights give >= 1 row a batch."""
    from hierdino.cli.pretrain import supervision_warning
    from hierdino.config import load_config

    counts = {"pool": (240_000, 0), "fine": (0, 1_500), "coarse": (0, 1_500)}
    data = _train_data(counts)
    cfg = load_config("tiny-cpu", ["train.batch_size=32", "scaling.num_workers=1"])
    assert _labelled_rows(data, data.proportions, 32) < LABELLED_ROWS_FLOOR
    warning = supervision_warning(cfg, data)
    assert warning and "data.weights=[" in warning and len(warning.splitlines()) <= 2
    weights = [float(w) for w in re.search(r"data\.weights=\[([^\]]*)\]", warning).group(1).split(",")]
    assert len(weights) == 3 and _labelled_rows(data, weights, 32) >= LABELLED_ROWS_FLOOR
    assert supervision_warning(cfg, _train_data(counts, weights)) is None  # the run with them does not warn
    # per worker: the same global batch over 4 workers is 8 rows each, still warned, with its own weights
    split = supervision_warning(load_config("tiny-cpu", ["train.batch_size=32", "scaling.num_workers=4"]), data)
    weights = [float(w) for w in re.search(r"data\.weights=\[([^\]]*)\]", split).group(1).split(",")]
    assert _labelled_rows(data, weights, 8) >= LABELLED_ROWS_FLOOR
    # the supervised loss off: nothing to warn about
    assert supervision_warning(load_config("tiny-cpu", ["loss.supervised.kind=none"]), data) is None
    assert supervision_warning(load_config("tiny-cpu", ["loss.supervised.weight=0"]), data) is None


def test_the_embedded_default_mix_does_not_warn():
    """tiny-cpu on the small synthetic suite (synth-fine and synth-coarse labelled, synth-unlabeled
    not), mixed by size: ~22 labelled rows a batch of 32."""
    from hierdino.cli.pretrain import supervision_warning
    from hierdino.config import load_config
    from hierdino.data.suite import SUITE

    specs = {s.name: s for s in SUITE}
    counts = {n: (0, specs[n].sizes["small"]) if specs[n].labels != "none" else (specs[n].sizes["small"], 0)
              for n in TRAIN_SETS}
    data = _train_data(counts)
    cfg = load_config("tiny-cpu")
    per_worker = cfg.train.batch_size // cfg.scaling.num_workers
    assert _labelled_rows(data, data.proportions, per_worker) >= LABELLED_ROWS_FLOOR
    assert supervision_warning(cfg, data) is None


def test_labelled_rows_warning_without_any_label_and_with_partly_labelled_sets():
    assert "never sees a label" in labelled_rows_warning([1000, 50], [0, 0], [0.5, 0.5], 32)
    # a set half labelled beside a pool: the labelled set's share doubles to reach the same rows
    sizes, labelled = [100_000, 2_000], [0, 1_000]
    warning = labelled_rows_warning(sizes, labelled, mix_proportions(sizes), 32)
    weights = [float(w) for w in re.search(r"data\.weights=\[([^\]]*)\]", warning).group(1).split(",")]
    assert weights == pytest.approx([0.75, 0.25])  # 25% of the batch, half labelled: 4 rows of 32
