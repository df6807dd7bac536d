"""Every batch mixes all training datasets at row level in the configured proportions."""

import numpy as np
import pytest

from hierdino.data.ingest import CropSpec, build_train_datasets, describe_train_data, resume_position, stream_name
from hierdino.data.mix import MixedBatches, MixSchedule, mix_proportions
from hierdino.data.suite import TRAIN_SETS
from hierdino.hierarchy import load_hierarchy


def test_mix_schedule_counts_by_hand():
    s = MixSchedule([0.5, 0.25, 0.25], 4)
    assert [s.counts(n).tolist() for n in range(3)] == [[2, 1, 1]] * 3
    s = MixSchedule([0.4, 0.3, 0.3], 10)  # owed 4, 3, 3 exactly
    assert s.counts(0).tolist() == [4, 3, 3]
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
        assert np.abs(counts.mean(0) / 32 - data.proportions).max() < 0.05
        labelled = np.array([(b["label"] >= 0).sum() for b in batches])
        assert (labelled > 0).all() and (labelled < 32).all()          # the unlabelled set is in every batch too
        # the source column is right: only the unlabelled set's rows carry -1
        assert all(((b["label"] == -1) == (b["source"] == 2)).all() for b in batches)

        heavy = _batches(describe_train_data(uris, h, [2.0, 1.0, 1.0]), crops, 30)
        heavy_share = np.mean([np.mean(b["source"] == 0) for b in heavy])
        assert heavy_share == pytest.approx(0.5, abs=0.05) and heavy_share > counts.mean(0)[0] / 32 + 0.05

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
