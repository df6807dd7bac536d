import json

import pytest
import yaml
from conftest import REPO

from hierdino.config import load_config
from hierdino.tune.space import SpaceError, check_space, load_space, trial_overrides
from hierdino.tune.sweep import run_sweep


def test_packaged_spaces_validate_against_the_config():
    for name in ("alpha", "level_weights", "loss_kind"):
        space = load_space(f"tune_spaces/{name}.yaml")
        assert check_space("tiny-cpu", [], space) == 4  # wbc-h1 has 4 levels


def test_level_weights_are_normalised():
    over = trial_overrides({"loss.supervised.level_weights@1": 2.0, "loss.supervised.level_weights@2": 1.0,
                            "loss.supervised.level_weights@3": 1.0, "loss.supervised.level_weights@4": 0.0}, {})
    assert over["loss.supervised.level_weights"] == [0.5, 0.25, 0.25, 0.0]
    assert over["loss.supervised.alpha"] is None


@pytest.mark.parametrize("params,message", [
    ({"loss.supervised.alpha": {"dist": "gaussian", "low": 0, "high": 1}}, "unknown dist 'gaussian'"),
    ({"loss.supervised.alpha": {"dist": "uniform", "low": 0.9, "high": 0.1}}, "low < high"),
    ({"loss.supervised.weight": {"dist": "loguniform", "low": 0.0, "high": 1.0}}, "log scale"),
    ({"loss.supervised.alpha": {"dist": "uniform", "low": 0.1}}, r"missing \['high'\]"),
    ({"loss.supervised.alpah": {"dist": "uniform", "low": 0.1, "high": 0.9}}, "did you mean loss.supervised.alpha"),
    ({"loss.supervised.kind": {"dist": "choice", "values": ["hxe", "softmax"]}}, "'softmax' is not one of"),
])
def test_bad_space_files_give_clear_errors(tmp_path, params, message):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"name": "bad", "params": params}))
    with pytest.raises(SpaceError, match=message):
        check_space("tiny-cpu", [], load_space(f))


@pytest.mark.parametrize("params,overrides,message", [
    # a float sampled between the bounds for an integer key: both bounds alone are fine
    ({"train.batch_size": {"dist": "uniform", "low": 16, "high": 64}}, [], r"batch_size: expected an integer, got '33.85"),
    # an odd batch from randint with two workers: the bounds 16 and 18 alone are fine
    ({"train.batch_size": {"dist": "randint", "low": 16, "high": 18}}, ["scaling.num_workers=2", "scaling.cpus_per_worker=0.5"],
     r"train.batch_size=17 is not divisible by scaling.num_workers=2"),
    ({"loss.supervised.alpha": {"dist": "uniform", "low": 0.1, "high": 0.9},
      "loss.supervised.level_weights": {"dist": "level_weights", "low": 0, "high": 1}}, [], "exclude each other"),
])
def test_spaces_are_checked_on_values_their_trials_draw_not_only_on_bounds(tmp_path, params, overrides, message):
    f = tmp_path / "space.yaml"
    f.write_text(yaml.safe_dump({"name": "s", "params": params}))
    with pytest.raises(SpaceError, match=message):
        check_space("tiny-cpu", overrides, load_space(f))


def test_sweep_validate_only_refuses_what_would_fail_after_ray_starts(tmp_path, capsys):
    from hierdino.cli.sweep import main

    space = _space(tmp_path, "train.seed", {"dist": "choice", "values": [1, 2]})
    for args, message in ((["--trials", "0"], "--trials must be >= 1"),
                          (["--set", "eval.every_steps=1000"], "eval.every_steps=1000 is more than train.steps=500"),
                          (["--seeds-per-trial", "2"], "needs --scheduler none")):
        assert main(["--space", str(space), "--validate-only", *args]) == 2
        assert message in capsys.readouterr().err
    assert main(["--space", str(space), "--validate-only"]) == 0


def test_two_trial_sweep_writes_outputs_and_asha_stops_the_bad_trial(ray_cluster, synth_suite, tmp_path):
    # Trial 2 evaluates on 8 px images (one patch): its external bAcc at the first rung is far
    # below trial 1's, so ASHA (reduction factor 2) must stop it there.
    space = tmp_path / "asha.yaml"
    space.write_text(yaml.safe_dump({"name": "asha_demo", "params": {"eval.image_size": {"dist": "grid", "values": [64, 8]}}}))
    out = tmp_path / "sweep"
    res = run_sweep("tiny-cpu", str(space), 1, str(out), "asha", 1, [
        f"data.synth_cache={synth_suite}", "train.steps=4", "train.batch_size=16", "checkpoint.every_steps=3",
        "eval.every_steps=2", "train.log_every=2", "eval.datasets=[synth-ext-1]"])  # checkpoints off the eval steps, 1-CPU worker
    rows = {r["eval.image_size"]: r for r in res["rows"]}
    assert rows["64"]["step"] == 4 and not rows["64"]["stopped_early"] and rows["64"]["chosen"]
    assert rows["8"]["stopped_early"] and rows["8"]["step"] == 2
    assert rows["64"]["ci_lo"] <= rows["64"]["ext_val_bacc"] <= rows["64"]["ci_hi"]  # the live evaluation's interval
    assert rows["64"]["ext_val_bacc"] > rows["8"]["ext_val_bacc"]
    for name in ("results.csv", "results.md", "objective.png", "best_config.yaml"):
        assert (out / name).stat().st_size > 100
    best = load_config(str(out / "best_config.yaml"))
    assert best.eval.image_size == 64 and best.train.steps == 4 and best.eval.every_steps == 2  # the user's settings
    assert best.eval.at_end  # not the sweep's own eval.at_end=false: a full run from best_config.yaml evaluates


def _synthetic(values: dict):
    """A trainable that reports ``values[seed] = [(step, objective, lo, hi), ...]`` without training;
    a list shorter than the budget is a trial stopped early (as ASHA stops one)."""
    def trainable(config):
        from ray import tune

        for step, v, lo, hi in values[config["sample"]["train.seed"]]:
            tune.report({"ext_val_bacc": v, "ext_val_bacc_lo": lo, "ext_val_bacc_hi": hi, "step": step})
    return trainable


def _space(tmp_path, key, dist):
    space = tmp_path / "syn.yaml"
    space.write_text(yaml.safe_dump({"name": "syn", "params": {key: dist}}))
    return space


def test_a_trial_stopped_early_never_wins_and_the_verdict_uses_intervals(ray_cluster, tmp_path):
    from hierdino.tune import sweep

    values = {  # keyed by train.seed; budget: train.steps = 8
        1: [(4, 0.95, 0.90, 0.99)],                           # the best value, but after half the budget
        2: [(4, 0.70, 0.6, 0.8), (8, 0.80, 0.75, 0.85)],
        3: [(4, 0.72, 0.6, 0.8), (8, 0.78, 0.74, 0.83)],
        4: [(4, 0.60, 0.5, 0.7), (8, 0.65, 0.60, 0.70)],
    }
    out = tmp_path / "sweep"
    res = sweep.run_sweep("tiny-cpu", str(_space(tmp_path, "train.seed", {"dist": "grid", "values": list(values)})), 1,
                          str(out), "none",
                          1, ["train.steps=8"], trainable=_synthetic(values))
    rows = {r["train.seed"]: r for r in res["rows"]}
    assert rows["1"]["stopped_early"] and not rows["1"]["chosen"]
    assert rows["2"]["chosen"] and res["best"]["train.seed"] == "2"
    assert res["rows"][0]["train.seed"] == "1"  # the table still sorts by value: the stopped trial stays visible
    assert "reached the full budget (8 steps)" in res["how"] and res["verdict"].startswith("not distinguishable")
    header = (out / "best_config.yaml").read_text().splitlines()[:3]
    assert "ext_val_bacc=0.8000 [0.7500, 0.8500] at step 8" in header[0] and "full budget" in header[1]


def test_choose_best_without_full_budget_compares_at_the_common_step():
    from hierdino.tune.report import choose_best

    def row(t, step, v):
        return {"trial": t, "ext_val_bacc": v, "ci_lo": v - 0.01, "ci_hi": v + 0.01, "step": step, "error": ""}

    rows = [row("a", 6, 0.70), row("b", 4, 0.90), row("c", 6, 0.60)]
    hist = {"a": [(2, 0.5, 0.4, 0.6), (4, 0.95, 0.93, 0.97), (6, 0.70, 0.69, 0.71)],
            "b": [(2, 0.6, 0.5, 0.7), (4, 0.90, 0.89, 0.91)], "c": [(4, 0.2, 0.1, 0.3), (6, 0.6, 0.59, 0.61)]}
    best, how, verdict = choose_best(rows, hist, total_steps=8)
    assert best["trial"] == "a" and "at step 4" in how  # a's 0.95 at step 4 beats b's 0.90 there
    assert verdict.startswith("distinguishable")  # [0.93, 0.97] lies above b's [0.89, 0.91]


def test_pooled_interval_matches_a_hand_computation():
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score

    from hierdino.eval.metrics import pooled_bacc_interval

    sets = [(["a", "a", "b", "b", "c"], ["a", "b", "b", "b", "a"]), (["x", "y", "y", "y"], ["x", "y", "x", "y"])]
    point, lo, hi = pooled_bacc_interval(sets, n=200, seed=3)
    assert point == pytest.approx((np.mean([1 / 2, 1, 0]) + np.mean([1, 2 / 3])) / 2)
    rng, means = np.random.default_rng(3), []
    for _ in range(200):  # the same resamples, scored by scikit-learn
        vals = []
        for t, p in sets:
            idx = rng.integers(0, len(t), len(t))
            with np.errstate(all="ignore"):
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    vals.append(balanced_accuracy_score([t[i] for i in idx], [p[i] for i in idx]))
        means.append(np.mean(vals))
    assert (lo, hi) == pytest.approx((np.quantile(means, 0.025), np.quantile(means, 0.975)))
    assert pooled_bacc_interval([(["a"] * 50 + ["b"] * 50, ["a"] * 50 + ["b"] * 50)], n=50)[1:] == (1.0, 1.0)


def test_optuna_search_runs_a_small_sweep(ray_cluster, tmp_path, monkeypatch):
    """--search optuna: the searcher Tune ran is Optuna's (TPE, seed 0), identified by its own state: its
    study was told every trial's objective, and it proposed the values a fresh Optuna study with the
    same sampler proposes (Tune's random search would propose others and tell no study anything)."""
    optuna = pytest.importorskip("optuna", reason="the optuna extra is not installed (CI installs it with the test extra)")
    from ray.tune.search.optuna import OptunaSearch

    from hierdino.tune import sweep

    made = []

    def spy(*a, **k):
        made.append(real_searcher(*a, **k))
        return made[-1]

    real_searcher = sweep.searcher
    monkeypatch.setattr(sweep, "searcher", spy)

    def trainable(config):
        from ray import tune

        x = config["sample"]["loss.supervised.alpha"]
        tune.report({"ext_val_bacc": 1 - (x - 0.3) ** 2, "ext_val_bacc_lo": 0.0, "ext_val_bacc_hi": 1.0, "step": 8})

    res = sweep.run_sweep("tiny-cpu", str(_space(tmp_path, "loss.supervised.alpha", {"dist": "uniform", "low": 0.0, "high": 1.0})), 3,
                          str(tmp_path / "opt"), "none", 1, ["train.steps=8"], search="optuna",
                          trainable=trainable)
    xs = [float(r["loss.supervised.alpha"]) for r in res["rows"]]
    assert len(xs) == 3 and len(set(xs)) == 3 and all(0 <= x <= 1 for x in xs)
    [alg] = made
    assert isinstance(alg, OptunaSearch) and isinstance(alg._sampler, optuna.samplers.TPESampler)
    # every trial was told to the searcher's study, with the objective the trainable reported
    told = alg._ot_study.trials
    assert [t.state for t in told] == [optuna.trial.TrialState.COMPLETE] * 3
    told_x = [next(iter(t.params.values())) for t in told]
    assert sorted(told_x) == pytest.approx(sorted(xs), rel=1e-6)
    assert [t.value for t in told] == pytest.approx([1 - (x - 0.3) ** 2 for x in told_x], rel=1e-9)
    # the proposals are TPE(seed=0)'s: a fresh study asks the same three values in the same order
    fresh = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    asked = []
    for x in told_x:
        t = fresh.ask()
        asked.append(t.suggest_float("alpha", 0.0, 1.0))
        fresh.tell(t, 1 - (asked[-1] - 0.3) ** 2)
    assert asked == pytest.approx(told_x, rel=1e-9)
    with pytest.raises(SpaceError, match="grid"):
        sweep.searcher("optuna", load_space(_space(tmp_path, "train.seed", {"dist": "grid", "values": [1, 2]})))


def test_sweep_outputs_default_under_run_storage(tmp_path):
    from hierdino.tune.sweep import default_out

    space = load_space(REPO / "tune_spaces" / "alpha.yaml")
    assert default_out(load_config("tiny-cpu", ["run.storage=s3://bucket/runs"]), space) == "s3://bucket/runs/sweeps/alpha"
    assert default_out(load_config("tiny-cpu", [f"run.storage={tmp_path}"]), space) == f"{tmp_path}/sweeps/alpha"


def test_seed_mean_and_history_by_hand(tmp_path):
    """Two seeds with zero-width evaluation intervals: the interval is the seeds' own spread,
    1.96 * s / sqrt(2) with s = |a - b| / sqrt(2), i.e. 1.96 * |a - b| / 2; one step only one seed
    reached is left out. The history keeps only fresh evaluations (eval steps and the last step)."""
    from hierdino.tune.sweep import eval_history, seed_mean

    a = {4: (0.70, 0.70, 0.70), 8: (0.80, 0.80, 0.80)}
    b = {4: (0.60, 0.60, 0.60)}
    [(step, (mean, lo, hi))] = seed_mean([a, b])
    assert step == 4 and mean == pytest.approx(0.65) and hi - mean == pytest.approx(1.96 * 0.10 / 2)
    [(_, (m1, lo1, hi1))] = seed_mean([{4: (0.7, 0.6, 0.8)}])  # one seed: its own bootstrap interval
    assert (m1, lo1, hi1) == pytest.approx((0.7, 0.6, 0.8))
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": 2, "ext_val_bacc": 0.5, "ext_val_bacc_lo": 0.4, "ext_val_bacc_hi": 0.6},
            {"step": 3, "ext_val_bacc": 0.5}, {"step": 4, "ext_val_bacc": 0.7}, {"step": 5, "loss": 1.0}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    cfg = load_config("tiny-cpu", ["train.steps=5", "eval.every_steps=2"])
    hist = eval_history(str(run), cfg)
    assert sorted(hist) == [2, 4] and hist[2] == (0.5, 0.4, 0.6)


def test_seeds_per_trial_refuses_asha(tmp_path):
    from hierdino.tune import sweep

    with pytest.raises(SpaceError, match="needs --scheduler none"):
        sweep.run_sweep("tiny-cpu", str(_space(tmp_path, "train.seed", {"dist": "grid", "values": [1]})), 1,
                        str(tmp_path / "s"), "asha", 1, ["train.steps=8"], seeds_per_trial=2)


def test_sweep_outputs_land_on_s3(ray_cluster, s3_server, tmp_path, monkeypatch):
    """No --out and run.storage on S3: the table, best config, plot and Tune's experiment state are
    written under <run.storage>/sweeps/<space> in the object store (SeaweedFS), where a cluster's
    sweep outlives its pods."""
    from hierdino.storage import StorageOptions, list_files, read_bytes
    from hierdino.tune import sweep

    s3_server.create_bucket("sweeps")
    for k, v in (("AWS_ACCESS_KEY_ID", s3_server.access_key), ("AWS_SECRET_ACCESS_KEY", s3_server.secret_key),
                 ("AWS_ENDPOINT_URL", s3_server.endpoint), ("AWS_REGION", "us-east-1")):
        monkeypatch.setenv(k, v)
    values = {1: [(8, 0.8, 0.7, 0.9)], 2: [(8, 0.6, 0.5, 0.7)]}
    space = _space(tmp_path, "train.seed", {"dist": "grid", "values": [1, 2]})
    out = sweep.default_out(load_config("tiny-cpu", ["run.storage=s3://sweeps"]), load_space(space))  # no --out given
    assert out == "s3://sweeps/sweeps/syn"
    res = sweep.run_sweep("tiny-cpu", str(space), 1, out, "none", 1, ["train.steps=8"],
                          trainable=_synthetic(values))
    assert res["best"]["train.seed"] == "1"
    opts = StorageOptions(**s3_server.storage_options())
    names = {p.split("sweeps/syn/", 1)[1] for p in list_files(out, "", opts)}
    assert {"results.csv", "results.md", "best_config.yaml", "objective.png"} <= names
    assert any(n.startswith("tune/syn/") for n in names)  # Tune's experiment state, for --resume
    assert yaml.safe_load(read_bytes(f"{out}/best_config.yaml", opts))["train"]["seed"] == 1


def test_a_rerun_of_a_sweep_defined_otherwise_is_refused_naming_what_differs(ray_cluster, tmp_path):
    """Tune would resume the saved sweep as it was and its results would be written under the new
    settings: a rerun into the same directory must define the same sweep (the same command resumes,
    or rewrites, it)."""
    from hierdino.tune import sweep
    from hierdino.tune.space import SpaceError

    values = {1: [(8, 0.7, 0.6, 0.8)], 2: [(8, 0.8, 0.7, 0.9)]}
    space = str(_space(tmp_path, "train.seed", {"dist": "grid", "values": list(values)}))
    out = str(tmp_path / "sweep")

    def run(trials, overrides):
        return sweep.run_sweep("tiny-cpu", space, trials, out, "none", 1, overrides,
                               trainable=_synthetic(values))

    assert run(1, ["train.steps=8"])["best"]["train.seed"] == "2"
    with pytest.raises(SpaceError, match=r"holds a sweep defined otherwise \(overrides: \['train.steps=8'\] -> "
                                         r"\['train.steps=16'\]; trials: 1 -> 2\)"):
        run(2, ["train.steps=16"])
    again = run(1, ["train.steps=8"])  # the same command: restored, the same winner
    assert again["best"]["train.seed"] == "2" and len(again["rows"]) == 2


def test_space_fixed_must_be_a_mapping_and_a_trial_error_is_named_by_its_innermost_line(tmp_path):
    from hierdino.tune.report import error_text
    from hierdino.tune.space import SpaceError, load_space

    path = tmp_path / "s.yaml"
    path.write_text("name: t\nparams:\n  loss.supervised.weight: {dist: uniform, low: 0.1, high: 1}\nfixed: hxe\n")
    with pytest.raises(SpaceError, match=r"s.yaml: 'fixed' must map config keys to values .* got 'hxe'"):
        load_space(path)
    wrapped = RuntimeError("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent "
                           "call last):\n  File \"loop.py\", line 3\nhierdino.train.loop.NonFiniteLossError: non-finite "
                           "loss at step 3 (dino nan | ibot nan)\n")
    assert error_text(wrapped) == "hierdino.train.loop.NonFiniteLossError: non-finite loss at step 3 (dino nan / ibot nan)"
    assert error_text(KeyError("x")) == "KeyError"


def test_a_signal_to_a_sweep_asks_tunes_graceful_stop_and_is_remembered(said):
    """SIGINT / SIGTERM during a sweep become Tune's own graceful stop (SIGUSR1, whose handler Tune
    installs while it runs) and mark the sweep interrupted (Tune then reports the stopped trials as
    finished); a second signal, or one before Tune listens, aborts. Tune's SIGINT handler is off."""
    import os
    import signal

    from hierdino.tune.sweep import SweepStop

    got = []
    sigint = signal.getsignal(signal.SIGINT)
    before = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))  # as Tune's handler while it runs
    try:
        with SweepStop() as stop:
            assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal == "SIGINT" and got == [signal.SIGUSR1] and "stopping the sweep" in said[0]
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
        assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ
        assert signal.getsignal(signal.SIGINT) is sigint  # the handlers before the sweep are back
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # Tune not listening yet: a signal aborts
        with SweepStop() as stop, pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal is None
    finally:
        signal.signal(signal.SIGUSR1, before)
