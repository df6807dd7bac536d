import pytest
import yaml

from hierdino.config import load_config
from hierdino.tune.sweep import SpaceError, check_space, load_space, run_sweep, trial_overrides


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


def test_two_trial_sweep_writes_outputs_and_asha_stops_the_bad_trial(ray_cluster, synth_suite, tmp_path):
    # Trial 2 evaluates on 8 px images (one patch): its external bAcc at the first rung is far
    # below trial 1's, so ASHA (reduction factor 2) must stop it there.
    space = tmp_path / "asha.yaml"
    space.write_text(yaml.safe_dump({"name": "asha_demo", "params": {"eval.image_size": {"dist": "grid", "values": [64, 8]}}}))
    out = tmp_path / "sweep"
    res = run_sweep("tiny-cpu", str(space), 1, str(out), "asha", 1, [
        f"data.synth_cache={synth_suite}", "train.steps=8", "train.batch_size=16", "checkpoint.every_steps=3",
        "eval.every_steps=4", "train.log_every=4"], log=lambda *_: None)  # checkpoints off the eval steps, 1-CPU worker
    rows = {r["eval.image_size"]: r for r in res["rows"]}
    assert rows["64"]["step"] == 8 and not rows["64"]["stopped_early"]
    assert rows["8"]["stopped_early"] and rows["8"]["step"] == 4
    assert rows["64"]["ext_val_bacc"] > rows["8"]["ext_val_bacc"]
    for name in ("results.csv", "results.md", "objective.png", "best_config.yaml"):
        assert (out / name).stat().st_size > 100
    best = load_config(str(out / "best_config.yaml"))
    assert best.eval.image_size == 64 and best.train.steps == 8 and best.eval.split == "val"
