"""The pre-registered comparison of issue #8: variants, scale overlay and the results table (no training)."""

import dataclasses

import numpy as np
import pytest

from hierdino.config import load_config

from hierdino.cli import reproduce
from hierdino.eval import compare


def _without_supervised(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    d["loss"].pop("supervised")
    return d


@pytest.mark.parametrize("scale", [None, "vits14-gpu"])
def test_variants_differ_only_in_the_supervised_loss(scale):
    over = reproduce.scale_overrides(scale)
    cfgs = {v: load_config(f"repro/{v}", over) for v in compare.VARIANTS}
    base = _without_supervised(cfgs["ssl"])
    for v, cfg in cfgs.items():
        assert _without_supervised(cfg) == base, v
    kinds = {v: (c.loss.supervised.kind, c.loss.supervised.alpha) for v, c in cfgs.items()}
    assert kinds == {"ssl": ("none", 0.5), "flat": ("flat", 0.5), "hxe-alpha0.5": ("hxe", 0.5), "hxe-sweep": ("hxe", None)}
    assert cfgs["ssl"].train.steps == 300 and cfgs["ssl"].train.seed == 0


def test_scale_overlay_changes_the_model_and_keeps_the_losses():
    plain = load_config("repro/flat")
    gpu = load_config("repro/flat", reproduce.scale_overrides("vits14-gpu"))
    assert (plain.model.arch, plain.data.image_size, plain.scaling.use_gpu) == ("vit_tiny_cpu", 64, False)
    assert (gpu.model.arch, gpu.data.image_size, gpu.scaling.use_gpu) == ("vit_small_patch14_dinov2", 224, True)
    assert gpu.model.dino_head.prototypes == 65536 and gpu.data.local_crops_number == 0 and gpu.loss.dino_local is False
    assert gpu.loss.supervised == plain.loss.supervised and gpu.train.steps == plain.train.steps
    assert gpu.data.synth_cache.endswith("synth-224")


def test_unknown_scale_names_the_known_ones():
    with pytest.raises(SystemExit, match=r"unknown --scale 'vitg'.*known: vits14-gpu"):
        reproduce.scale_overrides("vitg")


def _row(model, dataset, probe, bacc, severity, ci):
    m = {"bacc": bacc, "severity": severity, "lineage_bacc": bacc + 0.1, "hF1": bacc - 0.1}
    return {"model": model, "dataset": dataset, "probe": probe,
            "metrics": {k: {"value": v, "ci95": list(ci) if k == "bacc" else [v, v]} for k, v in m.items()}}


def test_summary_is_mean_and_sample_sd_over_seeds_and_the_table_shows_it():
    runs = {"flat": ["/r/flat-s0", "/r/flat-s1"], "hxe-alpha0.5": ["/r/hxe-alpha0.5-s0", "/r/hxe-alpha0.5-s1"]}
    rows = [_row("flat-s0", "synth-ood", "logreg", 0.60, 2.0, (0.55, 0.65)),
            _row("flat-s1", "synth-ood", "logreg", 0.64, 1.6, (0.59, 0.69)),
            _row("hxe-alpha0.5-s0", "synth-ood", "logreg", 0.70, 1.0, (0.65, 0.75)),
            _row("hxe-alpha0.5-s1", "synth-ood", "logreg", 0.71, 1.2, (0.66, 0.77)),
            _row("someone-else", "synth-ood", "logreg", 0.99, 0.0, (0.9, 1.0))]
    setup = {"scale": None, "arch": "vit_tiny_cpu", "image_size": 64, "steps": 300, "batch_size": 32, "seeds": [0, 1],
             "device": "2 CPUs", "level_weights_source": "from the val-split sweep"}
    counts = {"ssl": 0, "flat": 10, "hxe-alpha0.5": 17, "hxe-sweep": 17, "_fine": 10, "_coarse": 7}
    s = compare.summarise({"rows": rows}, runs, counts, [0.1, 0.2, 0.3, 0.4], 0.5, setup)
    flat = s["table"]["flat"]["synth-ood"]["logreg"]
    assert flat["bacc"]["mean"] == pytest.approx(0.62)
    assert flat["bacc"]["sd"] == pytest.approx(np.sqrt(((0.60 - 0.62) ** 2 + (0.64 - 0.62) ** 2) / 1))
    assert flat["severity"]["mean"] == pytest.approx(1.8)
    assert s["table"]["hxe-alpha0.5"]["synth-ood"]["logreg"]["bacc_ci95_mean"] == pytest.approx([0.655, 0.76])
    assert set(s["table"]) == {"flat", "hxe-alpha0.5"}  # rows of other models are not counted
    md = compare.markdown(s, ["logreg"])
    assert "| (b) flat CE | synth-ood | 62.0 ± 2.8 [57.0, 67.0] | 1.80 ± 0.28 | 72.0 ± 2.8 |" in md
    assert "| (c) HXE alpha=0.5 | synth-ood | 70.5 ± 0.7 [65.5, 76.0] |" in md
    assert "SSL only" not in md.split("|---|")[1]  # no rows for a variant that did not run
    assert "the 10 leaf-labelled images" in md and "the 7 coarse-labelled" in md
    (c,) = compare.contrasts(s, ["logreg"])  # only (c) - (b) has both sides
    assert (c["x"], c["y"], c["dataset"], c["wins"], c["seeds"]) == ("hxe-alpha0.5", "flat", "synth-ood", 2, 2)
    assert c["diff"] == pytest.approx(0.085) and c["sd"] == pytest.approx(np.std([0.10, 0.07], ddof=1))
    assert c["ci_half_width"] == pytest.approx((0.05 + 0.05 + 0.05 + 0.055) / 4)
    assert "| (c) HXE alpha=0.5 - (b) flat CE | synth-ood | +8.5 ± 2.1 (2/2; ±5.1) |" in md


def test_time_budget_uses_the_steady_state_step_and_counts_the_start_up_per_run():
    # metrics.jsonl of a 40-step calibration run on an H100: the first batch waited ~40 s for the pipeline
    recs = [{"step": 20, "images_per_s": 29.708831}, {"step": 30, "images_per_s": 42.386667},
            {"step": 40, "images_per_s": 53.937707}]
    steps, step_s, overhead = reproduce.steps_for_budget(recs, 64, wall_s=80.5, left_s=300.0, n_runs=2)
    e30, e40 = 30 * 64 / 42.386667, 40 * 64 / 53.937707
    assert step_s == pytest.approx((e40 - e30) / 10)
    assert overhead == pytest.approx(80.5 - 40 * step_s)
    assert steps == int((150 - overhead) / step_s) // 10 * 10 == 360
