"""The pre-registered comparison of issue #8: variants, scale overlay and the results table (no training)."""

import dataclasses

import numpy as np
import pytest

from hierdino.cli import reproduce
from hierdino.config import load_config
from hierdino.experiments import compare, stages


def _without_supervised(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    d["loss"].pop("supervised")
    return d


@pytest.mark.parametrize("scale", [None, "vits14-gpu"])
def test_variants_differ_only_in_the_supervised_loss(scale):
    over = stages.scale_overrides(scale)
    cfgs = {v: load_config(f"repro/{v}", over) for v in compare.VARIANTS}
    base = _without_supervised(cfgs["ssl"])
    for v, cfg in cfgs.items():
        assert _without_supervised(cfg) == base, v
    kinds = {v: (c.loss.supervised.kind, c.loss.supervised.alpha) for v, c in cfgs.items()}
    assert kinds == {"ssl": ("none", 0.5), "flat": ("flat", 0.5), "hxe-alpha0.5": ("hxe", 0.5), "hxe-sweep": ("hxe", None)}
    assert cfgs["ssl"].train.steps == 300 and cfgs["ssl"].train.seed == 0


def test_scale_overlay_changes_the_model_and_keeps_the_losses():
    plain = load_config("repro/flat")
    gpu = load_config("repro/flat", stages.scale_overrides("vits14-gpu"))
    assert (plain.model.arch, plain.data.image_size, plain.scaling.use_gpu) == ("vit_tiny_cpu", 64, False)
    assert (gpu.model.arch, gpu.data.image_size, gpu.scaling.use_gpu) == ("vit_small_patch14_dinov2", 224, True)
    assert gpu.model.dino_head.prototypes == 65536 and gpu.data.local_crops_number == 0 and gpu.loss.dino_local is False
    assert gpu.loss.supervised == plain.loss.supervised and gpu.train.steps == plain.train.steps
    assert gpu.data.synth_cache.endswith("synth-224")


def test_unknown_scale_names_the_known_ones():
    with pytest.raises(SystemExit, match=r"unknown --scale 'vitg'.*known: vits14-gpu"):
        stages.scale_overrides("vitg")


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
    steps, step_s, overhead = stages.steps_for_budget(recs, 64, wall_s=80.5, left_s=300.0, n_runs=2)
    e30, e40 = 30 * 64 / 42.386667, 40 * 64 / 53.937707
    assert step_s == pytest.approx((e40 - e30) / 10)
    assert overhead == pytest.approx(80.5 - 40 * step_s)
    assert steps == int((150 - overhead) / step_s) // 10 * 10 == 360



def test_steps_per_variant_come_from_the_flag_then_the_first_start_then_the_budget_then_the_design(tmp_path, said):
    from argparse import Namespace

    calibrations = []

    def calibrate():
        calibrations.append(1)
        return 70

    args, preset = Namespace(out=str(tmp_path), steps=None, time_budget_min=None), "repro/v2/base"
    design = load_config(preset, []).train.steps
    assert stages.planned_steps(args, calibrate, preset, []) == (design, {}) and design == 300
    args.time_budget_min = 30
    assert stages.planned_steps(args, calibrate, preset, []) == (70, {}) and calibrations == [1]
    (tmp_path / "plan.json").write_text('{"steps": 50, "base_steps": 100}')  # an earlier start's plan wins
    assert stages.planned_steps(args, calibrate, preset, []) == (50, {"steps": 50, "base_steps": 100})
    assert calibrations == [1] and any("fixed by the first start of this run: 50" in line for line in said), said
    args.steps = 20  # the flag wins over everything; the earlier plan still comes back (v2 keeps its history)
    assert stages.planned_steps(args, calibrate, preset, []) == (20, {"steps": 50, "base_steps": 100})

# ---- design v2 (issue #16) ----

from hierdino.eval.metrics import bootstrap, mistake_severity, paired_bacc_difference  # noqa: E402
from hierdino.experiments import paired  # noqa: E402
from hierdino.hierarchy import load_hierarchy  # noqa: E402


def test_v2_variants_differ_only_in_the_supervised_loss_and_continue_from_one_base():
    cfgs = {v: load_config(f"repro/v2/{v}") for v in paired.VARIANTS}
    base = _without_supervised(cfgs["ssl"])
    for v, cfg in cfgs.items():
        assert _without_supervised(cfg) == base, v
    sup = {v: (c.loss.supervised.kind, c.loss.supervised.weight, c.loss.supervised.alpha, c.loss.supervised.normalize)
           for v, c in cfgs.items()}
    assert sup == {"ssl": ("none", 0.5, 0.5, "path"), "flat": ("flat", 0.5, 0.5, "path"),
                   "hxe-path": ("hxe", 0.5, 0.5, "path"), "hxe-tree": ("hxe", 0.5, 0.5, "tree"),
                   "hxe-sweep": ("hxe", 0.5, None, "path")}
    # the shared base model is the SSL variant trained from scratch
    assert dataclasses.asdict(load_config("repro/v2/pretrain")) == dataclasses.asdict(cfgs["ssl"])
    assert cfgs["flat"].model.init_weights is None and cfgs["flat"].train.seed == 0


def test_v2_command_line_checks_the_variants_against_the_design(capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--design", "v2", "--variants", "hxe-alpha0.5", "--render"])
    assert "not in design v2" in capsys.readouterr().err


def _sk_bacc(t, p):
    import warnings

    from sklearn.metrics import balanced_accuracy_score  # an independent implementation of bAcc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resample may miss a class: sklearn warns, and scores it as we do
        return balanced_accuracy_score(t, p)


def test_paired_bootstrap_matches_a_hand_computation_with_the_same_draws():
    y1 = ["a", "a", "a", "b", "b", "c", "c", "c"]
    x1 = [["a", "a", "b", "b", "b", "c", "c", "a"], ["a", "a", "a", "b", "c", "c", "c", "c"]]
    z1 = [["a", "b", "b", "b", "a", "c", "a", "a"], ["a", "a", "b", "b", "c", "c", "b", "c"]]
    y2 = ["p", "q", "q", "p", "p", "q"]
    x2 = [["p", "q", "q", "p", "q", "q"], ["p", "q", "p", "p", "p", "q"]]
    z2 = [["q", "q", "q", "p", "q", "q"], ["p", "p", "p", "p", "p", "q"]]
    r = paired_bacc_difference([(y1, x1, z1), (y2, x2, z2)], n=50, seed=7)

    def stat(idx1, idx2):
        per_seed = []
        for s in range(2):
            d1 = _sk_bacc(np.array(y1)[idx1], np.array(x1[s])[idx1]) - _sk_bacc(np.array(y1)[idx1], np.array(z1[s])[idx1])
            d2 = _sk_bacc(np.array(y2)[idx2], np.array(x2[s])[idx2]) - _sk_bacc(np.array(y2)[idx2], np.array(z2[s])[idx2])
            per_seed.append((d1 + d2) / 2)
        return np.mean(per_seed), per_seed

    point, per_seed = stat(np.arange(8), np.arange(6))
    # by hand: seed 0 -> set 1: (2/3 + 1 + 2/3)/3 - (1/3 + 1/2 + 1/3)/3, set 2: 5/6 - 4/6; seed 1 likewise
    assert point == pytest.approx(r["diff"]) and per_seed == pytest.approx(r["per_seed"])
    assert per_seed[0] == pytest.approx(((7 / 3) / 3 - (7 / 6) / 3 + (5 / 6 - 4 / 6)) / 2)
    rng = np.random.default_rng(7)
    draws = []
    for _ in range(50):
        i1, i2 = rng.integers(0, 8, 8), rng.integers(0, 6, 6)  # the same images for both models and seeds
        draws.append(stat(i1, i2)[0])
    assert r["ci95"] == pytest.approx((np.quantile(draws, 0.025), np.quantile(draws, 0.975)))
    assert r["se"] == pytest.approx(np.std(draws, ddof=1))


def test_paired_interval_is_narrower_than_unpaired_when_errors_are_shared():
    rng = np.random.default_rng(0)
    h = load_hierarchy("wbc-h1")
    classes = list(h.leaves[:4])
    y = [str(c) for c in rng.choice(classes, 600)]
    x = [c if rng.random() < 0.7 else str(rng.choice(classes)) for c in y]  # 70% + chance
    z = [b if rng.random() < 0.95 else str(rng.choice(classes)) for b in x]  # X's errors, plus 5% more
    r = paired_bacc_difference([(y, [x], [z])], n=300, seed=1)
    wx, wz = (np.diff(bootstrap(y, p, h, 300, seed=1)["bacc"])[0] for p in (x, z))
    unpaired = np.hypot(wx, wz)  # the width of a difference of two independent intervals
    assert r["ci95"][1] - r["ci95"][0] < 0.5 * unpaired
    assert r["ci95"][0] <= r["diff"] <= r["ci95"][1]


LEAVES = ("neutrophil_band", "neutrophil_segmented", "lymphocyte_typical")


def _predictions(rng, names, n=40):
    y = [str(v) for v in rng.choice(LEAVES, n)]
    return {"y_true": y} | {m: {"logreg": [v if rng.random() < 0.8 else str(rng.choice(LEAVES)) for v in y]} for m in names}


def test_v2_report_renders_base_variants_and_paired_contrasts_from_stored_results(tmp_path):
    rng = np.random.default_rng(3)
    runs = {v: [f"/r/{v}-s0", f"/r/{v}-s1"] for v in ("ssl", "flat", "hxe-path")}
    names = [paired.run_name(u) for uris in runs.values() for u in uris]
    preds = {ds: _predictions(rng, names) for ds in compare.EXTERNAL_SETS}
    rows = [_row(m, ds, "logreg", 0.7 + 0.01 * i, 1.2, (0.6, 0.8)) for i, m in enumerate(names) for ds in compare.EXTERNAL_SETS]
    rows += [_row(m, ds, "logreg", b, 1.0, (b - 0.05, b + 0.05)) for m, b in (("base", 0.8), ("random-vit_tiny_cpu", 0.6))
             for ds in compare.EXTERNAL_SETS]
    setup = {"scale": None, "arch": "vit_tiny_cpu", "image_size": 64, "steps": 120, "batch_size": 32, "seeds": [0, 1],
             "device": "2 CPUs", "level_weights_source": "from the val-split sweep", "test_images": {"synth-ood": 1500},
             "bootstrap": 100}
    counts = {"_fine": 10, "_coarse": 7}
    s = compare.summarise({"rows": rows}, runs, counts, [0.1, 0.2, 0.3, 0.4], 1.5, setup,
                          variants={v: paired.VARIANTS[v] for v in runs})
    s["design"], s["probes"] = "v2", ["logreg"]
    s["base"] = paired.base_summary(rows, "base", "random-vit_tiny_cpu", ["logreg"], 240)
    trees = {ds: load_hierarchy("wbc-h1") for ds in compare.EXTERNAL_SETS}
    s["paired"] = paired.paired_contrasts(preds, runs, ["logreg"], n=100, hierarchies=trees)
    # only contrasts whose two variants ran: (c)-(b), (b)-(a), (c)-(a); bAcc and severity, each on 3 sets + pooled
    assert {(r["x"], r["y"]) for r in s["paired"]} == {("hxe-path", "flat"), ("flat", "ssl"), ("hxe-path", "ssl")}
    assert len(s["paired"]) == 3 * 2 * 4
    # the severity rows' point values are mistake_severity's (an independent function) averaged over seeds
    sev = next(r for r in s["paired"] if (r["x"], r["y"], r["metric"], r["dataset"]) == ("flat", "ssl", "severity", "synth-ood"))
    p = preds["synth-ood"]
    by_hand = [mistake_severity(p["y_true"], p[f"flat-s{i}"]["logreg"], trees["synth-ood"])[0]
               - mistake_severity(p["y_true"], p[f"ssl-s{i}"]["logreg"], trees["synth-ood"])[0] for i in (0, 1)]
    assert sev["per_seed"] == pytest.approx(by_hand) and sev["ci95"][0] <= sev["diff"] <= sev["ci95"][1]
    (tmp_path / "results.json").write_text(__import__("json").dumps(s))
    assert reproduce.main(["--design", "v2", "--render", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "results.md").read_text()
    assert all((tmp_path / "plots" / f).stat().st_size > 5000 for f in ("bacc.png", "severity.png"))
    assert "## The shared SSL base model (240 steps from scratch)" in md
    assert "| base | mean | 80.0 |" in md and "| random | mean | 60.0 |" in md
    assert "Trained minus random, mean over the three sets: logreg +20.0 points." in md
    assert "| (c) HXE alpha=0.5, path | synth-ood | 74.5 ± 0.7 [60.0, 80.0] |" in md
    pooled = next(r for r in s["paired"] if (r["x"], r["y"], r["dataset"]) == ("hxe-path", "flat", "pooled"))
    assert "| (c) HXE alpha=0.5, path - (b) flat CE | logreg |" in md
    assert f"{100 * pooled['mde']:.1f} |" in md and "Minimum detectable effect" in md
    assert "Mistake severity X - Y (logreg probe" in md
    assert md.count("| (b) flat CE - (a) SSL only |") == 2 and "| (b) flat CE - (a) SSL only | logreg |" in md


def test_mde_is_the_power_formula_on_a_hand_case():
    """MDE = (z_0.975 + z_0.80) x SE, with SE known in closed form here (not read from the code).

    Every image is of one class, so bAcc is plain accuracy, a mean over images. Y is right on every
    image; X's seed 0 misses the first half of each set, seed 1 the first quarter. The seed-averaged
    per-image difference d is -1 on a quarter of the images, -1/2 on a quarter and 0 on half:
    mean -3/8, mean of squares 5/16, variance 5/16 - 9/64 = 11/64. The bootstrap resamples m images,
    so SE = sqrt(11/64 / m) on one set and, pooled (the mean of three independently resampled sets),
    sqrt(sum_d 11/64 / m_d) / 3."""
    from statistics import NormalDist

    sizes = dict(zip(compare.EXTERNAL_SETS, (200, 300, 400)))
    runs = {"hxe-path": ["/r/hxe-path-s0", "/r/hxe-path-s1"], "flat": ["/r/flat-s0", "/r/flat-s1"]}
    preds = {}
    for ds, m in sizes.items():
        miss = lambda k, m=m: ["b"] * k + ["a"] * (m - k)  # noqa: E731
        preds[ds] = {"y_true": ["a"] * m, "hxe-path-s0": {"logreg": miss(m // 2)}, "hxe-path-s1": {"logreg": miss(m // 4)},
                     "flat-s0": {"logreg": miss(0)}, "flat-s1": {"logreg": miss(0)}}
    rows = {r["dataset"]: r for r in paired.paired_contrasts(preds, runs, ["logreg"], n=4000)}
    assert set(rows) == {*compare.EXTERNAL_SETS, paired.POOLED}
    z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.80)  # 1.960 + 0.842
    var = 11 / 64
    hand_se = {ds: (var / m) ** 0.5 for ds, m in sizes.items()}
    hand_se[paired.POOLED] = sum(var / m for m in sizes.values()) ** 0.5 / 3
    for ds, r in rows.items():
        assert r["diff"] == pytest.approx(-3 / 8, abs=1e-12), ds
        # 4000 resamples estimate an SE to ~1.1% (relative s.d. 1/sqrt(2n)); 5% is > 4 s.d.
        assert r["se"] == pytest.approx(hand_se[ds], rel=0.05), ds
        assert r["mde"] == pytest.approx(z * hand_se[ds], rel=0.05), ds
        assert r["mde"] / r["se"] == pytest.approx(z, rel=2e-3), ds  # the factor itself, free of resampling noise
    # the report's MDE column shows the pooled row's value in points: ~4.0 by hand
    md = "\n".join(paired.contrast_table({"paired": list(rows.values()), "variants": paired.VARIANTS}, ["logreg"]))
    line = next(x for x in md.splitlines() if x.startswith("| (c) HXE alpha=0.5, path - (b) flat CE | logreg |"))
    assert float(line.rstrip(" |").rsplit("|", 1)[-1]) == pytest.approx(100 * z * hand_se[paired.POOLED], abs=0.25)


def test_a_rerun_asking_other_steps_does_not_reuse_the_finished_runs(tmp_path):
    """A comparison's run with an export is reused only for the same config: a smoke test's 40-step
    runs in the same --out are refused by name, before anything trains."""
    from hierdino.config import load_config
    from hierdino.config.compat import ResumeError
    from hierdino.experiments.stages import train_once

    sets = [f"run.storage={tmp_path}", "run.name=ssl-s0"]
    run = tmp_path / "ssl-s0"
    (run / "export").mkdir(parents=True)
    (run / "export" / "model.json").write_text("{}")
    (run / "config.yaml").write_text(load_config("tiny-cpu", sets + ["train.steps=40"]).to_yaml())
    assert train_once("tiny-cpu", sets + ["train.steps=40"]) == str(run)  # the same run: reused, nothing trains
    with pytest.raises(ResumeError, match=r"ssl-s0 was started with train.steps=40, this comparison asks 300"):
        train_once("tiny-cpu", sets + ["train.steps=300"])
    with pytest.raises(ResumeError, match=r"optim.base_lr"):
        train_once("tiny-cpu", sets + ["train.steps=40", "optim.base_lr=0.5"])
