"""Ray Tune sweeps: each trial is a short pretrain scored on the external **val** splits.

A search space is YAML (``tune_spaces/*.yaml``)::

    name: alpha
    params:
      loss.supervised.alpha: {dist: uniform, low: 0.1, high: 0.9}
      loss.supervised.weight: {dist: loguniform, low: 0.1, high: 2.0}
    fixed:                      # optional overrides applied to every trial
      loss.supervised.kind: hxe

Distributions: ``uniform`` / ``loguniform`` (low, high), ``randint`` (low, high), ``choice``
(values), ``grid`` (values; every value once per sample), and ``level_weights`` (low, high: one
free weight per hierarchy level, sampled independently then normalised to sum 1 and written to
``loss.supervised.level_weights``).

Each trial is a function trainable that starts its own ``TorchTrainer`` (Ray Train V2) with the
trial's overrides; ``TuneReportCallback`` forwards the training reports, which carry
``ext_val_bacc`` every ``eval.every_steps`` so ASHA can stop bad trials early. Notes for Ray 2.60:
the trial drivers reserve no CPU (``tune.with_resources``) and ``max_concurrent_trials`` keeps
trial drivers from queueing for the workers' resources; the dashboard stays on, since without it a
trial stopped by ASHA can leave its Train resources reserved (ray-project/ray #54305).
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hierdino.config import ConfigError, load_config, override_text
from hierdino import storage
from hierdino.storage import StorageOptions
from hierdino.eval.live import OBJECTIVE

DISTS = {"uniform": ("low", "high"), "loguniform": ("low", "high"), "randint": ("low", "high"),
         "choice": ("values",), "grid": ("values",), "level_weights": ("low", "high")}


class SpaceError(ValueError):
    """A search-space file that cannot be used; the message names the file, parameter and field."""


@dataclass
class Space:
    name: str
    params: dict[str, dict]
    fixed: dict[str, object] = field(default_factory=dict)
    source: str = "<memory>"

    def tune_space(self, levels: int) -> dict:
        from ray import tune

        out = {}
        for key, p in self.params.items():
            d = p["dist"]
            if d == "uniform":
                out[key] = tune.uniform(p["low"], p["high"])
            elif d == "loguniform":
                out[key] = tune.loguniform(p["low"], p["high"])
            elif d == "randint":
                out[key] = tune.randint(p["low"], p["high"] + 1)
            elif d == "choice":
                out[key] = tune.choice(p["values"])
            elif d == "grid":
                out[key] = tune.grid_search(p["values"])
            elif d == "level_weights":
                for i in range(1, levels + 1):
                    out[f"{key}@{i}"] = tune.uniform(p["low"], p["high"])
        return out


def load_space(path: str | Path) -> Space:
    """Read and validate a search-space YAML file."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict) or not data["params"]:
        raise SpaceError(f"{path}: expected a mapping with a non-empty 'params' mapping")
    unknown_top = set(data) - {"name", "params", "fixed", "description"}
    if unknown_top:
        raise SpaceError(f"{path}: unknown top-level key(s) {sorted(unknown_top)}; expected name, params, fixed, description")
    for key, p in data["params"].items():
        where = f"{path}: params.{key}"
        if not isinstance(p, dict) or "dist" not in p:
            raise SpaceError(f"{where}: expected a mapping with 'dist' (one of {', '.join(DISTS)})")
        d = p["dist"]
        if d not in DISTS:
            raise SpaceError(f"{where}: unknown dist {d!r}; one of {', '.join(DISTS)}")
        need = DISTS[d]
        missing = [k for k in need if k not in p]
        extra = set(p) - set(need) - {"dist"}
        if missing or extra:
            raise SpaceError(f"{where}: dist {d} takes {', '.join(need)}; missing {missing}, unknown {sorted(extra)}")
        if "values" in need:
            if not isinstance(p["values"], list) or not p["values"]:
                raise SpaceError(f"{where}: values must be a non-empty list, got {p['values']!r}")
        else:
            lo, hi = p["low"], p["high"]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or not lo < hi:
                raise SpaceError(f"{where}: needs numbers low < high, got low={lo!r} high={hi!r}")
            if d == "loguniform" and lo <= 0:
                raise SpaceError(f"{where}: loguniform needs low > 0 (log scale), got {lo}")
            if d == "level_weights" and lo < 0:
                raise SpaceError(f"{where}: level weights must be >= 0, got low={lo}")
            if d == "level_weights" and key != "loss.supervised.level_weights":
                raise SpaceError(f"{where}: dist level_weights only applies to loss.supervised.level_weights")
    return Space(str(data.get("name") or path.stem), dict(data["params"]), dict(data.get("fixed") or {}), str(path))


def trial_overrides(sample: dict, fixed: dict) -> dict:
    """Tune's sample -> config overrides (level weights gathered and normalised to sum 1)."""
    out = dict(fixed)
    levels = sorted((k for k in sample if "@" in k), key=lambda k: int(k.rsplit("@", 1)[1]))
    for k, v in sample.items():
        if "@" not in k:
            out[k] = v
    if levels:
        w = [float(sample[k]) for k in levels]
        total = sum(w) or 1.0
        out[levels[0].rsplit("@", 1)[0]] = [x / total for x in w]
        out["loss.supervised.alpha"] = None
    return out


def check_space(base: str, base_overrides: list[str], space: Space) -> int:
    """Every parameter must be a config key that accepts its values; returns the hierarchy depth."""
    cfg = load_config(base, base_overrides)
    levels = load_hierarchy_depth(cfg.hierarchy.name)
    for key, p in space.params.items():
        probes = p["values"] if "values" in p else ([p["low"], p["high"]] if p["dist"] != "level_weights" else [])
        if p["dist"] == "level_weights":
            sample = {f"{key}@{i}": 1.0 for i in range(1, levels + 1)}
            probes_over = [{k: override_text(v) for k, v in trial_overrides(sample, space.fixed).items()}]
        else:
            probes_over = [{k: override_text(v) for k, v in trial_overrides({key: v}, space.fixed).items()} for v in probes]
        for over in probes_over:
            try:
                load_config(base, list(base_overrides) + [f"{k}={v}" for k, v in over.items()])
            except ConfigError as e:
                raise SpaceError(f"{space.source}: params.{key}: {e}") from None
    return levels


def load_hierarchy_depth(name: str) -> int:
    from hierdino.hierarchy import load_hierarchy

    return load_hierarchy(name).max_depth


def _trial(config: dict) -> None:
    """The function trainable: one short pretrain with the trial's overrides (``seeds`` > 1: one per
    seed, one after the other, scored by their mean; see ``seed_mean``)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from hierdino.train.checkpoint import run_uri
    from hierdino.train.launch import build_trainer

    ctx = tune.get_context()
    over = trial_overrides(config["sample"], config["fixed"])
    overrides = list(config["base_overrides"]) + [f"{k}={override_text(v)}" for k, v in over.items()] + [
        f"run.storage={config['trials_dir']}", f"run.name={ctx.get_trial_id()}"]
    cfg = load_config(config["base"], overrides)
    seeds = config.get("seeds", 1)
    if seeds == 1:
        runs = [(cfg, [TuneReportCallback()])]
    else:
        runs = [(load_config(config["base"], overrides + [f"train.seed={cfg.train.seed + i}",
                                                          f"run.name={ctx.get_trial_id()}-seed{i}"]), None)
                for i in range(seeds)]
    histories = []
    for run_cfg, callbacks in runs:
        result = build_trainer(run_cfg, log=lambda *_: None, callbacks=callbacks).fit()
        if result.error:
            raise result.error
        histories.append(eval_history(run_uri(run_cfg), run_cfg))
    final = result.return_value or {}
    if seeds > 1:
        for step, values in seed_mean(histories):
            tune.report({OBJECTIVE: values[0], f"{OBJECTIVE}_lo": values[1], f"{OBJECTIVE}_hi": values[2], "step": step,
                         "seeds": seeds})
    elif OBJECTIVE in final:  # normally already reported at the last step; ASHA ends trials at max_t
        keys = (OBJECTIVE, f"{OBJECTIVE}_lo", f"{OBJECTIVE}_hi")
        tune.report({**{k: final[k] for k in keys if k in final}, "step": final.get("step")})


def eval_history(uri: str, cfg) -> dict[int, tuple[float, float, float]]:
    """``{step: (objective, lo, hi)}`` at the run's evaluation steps, read from its ``metrics.jsonl``."""
    import json

    out = {}

    for line in storage.read_bytes(storage.join(uri, "metrics.jsonl"), StorageOptions.from_config(cfg)).decode().splitlines():
        rec = json.loads(line)
        step = rec.get("step")
        fresh = step is not None and (step % cfg.eval.every_steps == 0 or step == cfg.train.steps)
        if fresh and OBJECTIVE in rec:
            out[int(step)] = (rec[OBJECTIVE], rec.get(f"{OBJECTIVE}_lo", math.nan), rec.get(f"{OBJECTIVE}_hi", math.nan))
    return out


def seed_mean(histories: list[dict]) -> list[tuple[int, tuple[float, float, float]]]:
    """Per evaluation step every seed reached: the mean objective over seeds and a 95% interval
    that counts both noises, the evaluation's and the seed's:
    ``mean +- 1.96 * sqrt(sum_i sigma_i^2 / n^2 + s^2 / n)``, with ``sigma_i`` = seed i's bootstrap
    half-width / 1.96 and ``s`` the standard deviation of the seeds' values."""
    steps = sorted(set.intersection(*(set(h) for h in histories)))
    out = []
    for step in steps:
        vals = [h[step] for h in histories]
        n = len(vals)
        mean = sum(v[0] for v in vals) / n
        boot = sum(((v[2] - v[1]) / 2 / 1.96) ** 2 for v in vals) / n ** 2
        seed_var = sum((v[0] - mean) ** 2 for v in vals) / (n - 1) if n > 1 else 0.0
        half = 1.96 * math.sqrt(boot + seed_var / n)
        out.append((step, (mean, mean - half, mean + half)))
    return out


def default_out(cfg, space: Space) -> str:
    """``<run.storage>/sweeps/<space>``: on S3 storage the results outlive the pod that ran the sweep."""
    base = cfg.run.storage if storage.is_s3(cfg.run.storage) else str(Path(cfg.run.storage).expanduser().absolute())
    return storage.join(base, "sweeps", space.name)


def searcher(search: str, space: Space, seed: int = 0):
    """``None`` (Tune's random sampling) or Ray Tune's Optuna searcher (TPE), which needs the extra."""
    if search == "random":
        return None
    if search != "optuna":
        raise SpaceError(f"--search must be random or optuna, got {search!r}")
    grid = [k for k, p in space.params.items() if p["dist"] == "grid"]
    if grid:
        raise SpaceError(f"{space.source}: dist grid ({', '.join(grid)}) enumerates values; a searcher proposes them. "
                         "Use --search random, or dist choice")
    try:
        import optuna

        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise SpaceError("--search optuna needs Optuna: pip install 'hierdino[optuna]'") from None
    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))


def run_sweep(base: str, space_path: str, trials: int, out: str, scheduler: str = "asha", max_concurrent: int = 1,
              base_overrides: list[str] | None = None, log=print, search: str = "random", trainable=None,
              seeds_per_trial: int = 1) -> dict:
    """Run (or resume) a sweep under ``out``; writes results.csv/.md, best_config.yaml and objective.png.

    ``trainable``: the function each trial runs (default: a short pretrain, ``_trial``); tests give
    one that reports without training, to check selection through the real Tune machinery.
    """
    from ray import tune

    space = load_space(space_path)
    base_overrides = list(base_overrides or [])
    cfg = load_config(base, base_overrides)
    if not cfg.eval.every_steps:
        base_overrides.append(f"eval.every_steps={max(1, cfg.train.steps // 4)}")
    base_overrides.append("eval.split=val")
    base_overrides.append("eval.at_end=false")
    if seeds_per_trial > 1:
        if scheduler == "asha":
            raise SpaceError("--seeds-per-trial > 1 needs --scheduler none: ASHA compares trials at its rungs while "
                             "they train, and a seed mean exists only once every seed of a trial has run")
        every = load_config(base, base_overrides).eval.every_steps
        base_overrides.append(f"train.log_every={every}")  # every evaluation step is a logged step
    cfg = load_config(base, base_overrides)
    levels = check_space(base, base_overrides, space)
    remote = storage.is_s3(out)  # on a cluster, sweep outputs and trial runs go to shared storage
    out_path = out.rstrip("/") if remote else str(Path(out).expanduser().absolute())
    if not remote:
        os.makedirs(out_path, exist_ok=True)
    sched = None
    if scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        sched = ASHAScheduler(time_attr="step", max_t=cfg.train.steps, grace_period=cfg.eval.every_steps, reduction_factor=2)
    elif scheduler != "none":
        raise SpaceError(f"scheduler must be asha or none, got {scheduler!r}")
    param_space = {"sample": space.tune_space(levels), "fixed": space.fixed, "base": base, "seeds": seeds_per_trial,
                   "base_overrides": base_overrides, "trials_dir": storage.join(out_path, "trials")}
    # A trial driver only waits on its TorchTrainer: it holds no CPU (a bundle needs some resource,
    # hence 1 MiB of memory). Even 0.01 CPU left the trial's Ray Data unable to start on 2 CPUs.
    trainable = tune.with_resources(trainable or _trial, {"cpu": 0, "memory": 2 ** 20})
    search_alg = searcher(search, space)
    exp_dir = storage.join(out_path, "tune")
    if tune.Tuner.can_restore(storage.join(exp_dir, space.name)):
        log(f"[hierdino] resuming the sweep in {exp_dir}/{space.name}")
        tuner = tune.Tuner.restore(storage.join(exp_dir, space.name), trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=OBJECTIVE, mode="max", num_samples=trials, scheduler=sched,
                                        search_alg=search_alg, max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=space.name, storage_path=exp_dir),
        )
    grid = tuner.fit()
    return write_outputs(grid, base, base_overrides, space, out_path, cfg.train.steps, log)


RESULT_KEYS = ("trial", OBJECTIVE, "ci_lo", "ci_hi", "step", "stopped_early", "chosen", "evaluations", "error")


def _history(result) -> list[tuple[int, float, float, float]]:
    """A trial's reported (step, objective, interval low, interval high), in order."""
    df = result.metrics_dataframe
    if df is None or OBJECTIVE not in df or "step" not in df:
        return []
    out = []
    for _, row in df.iterrows():
        v = row.get(OBJECTIVE)
        if v == v and v is not None and row.get("step") == row.get("step"):
            out.append((int(row["step"]), float(v), float(row.get(f"{OBJECTIVE}_lo", math.nan)),
                        float(row.get(f"{OBJECTIVE}_hi", math.nan))))
    return out


def choose_best(rows: list[dict], histories: dict[str, list], total_steps: int) -> tuple[dict | None, str, str]:
    """The winner, how it was chosen, and whether it is distinguishable from the runner-up.

    Among trials without error: those that reached the full budget (ASHA's top rung) compete on
    their final objective; if none did, every trial's objective at the largest step all of them
    reached. A trial stopped early never wins against full-budget trials: its value was measured
    after less training. The verdict compares the winner's bootstrap interval with the runner-up's.
    """
    ok = [r for r in rows if not r["error"] and r[OBJECTIVE] == r[OBJECTIVE]]
    if not ok:
        return None, "no trial finished without error", ""
    full = [r for r in ok if (r["step"] or 0) >= total_steps]
    if full:
        pool = [(r, r[OBJECTIVE], r["ci_lo"], r["ci_hi"]) for r in full]
        how = f"best {OBJECTIVE} among the {len(full)} trial(s) that reached the full budget ({total_steps} steps)"
    else:
        common = min(r["step"] or 0 for r in ok)
        pool = []
        for r in ok:
            at = [h for h in histories.get(r["trial"], []) if h[0] <= common]
            if at:
                pool.append((r, *at[-1][1:]))
        how = (f"no trial reached the full budget ({total_steps} steps): best {OBJECTIVE} at step {common}, "
               f"the largest step all {len(ok)} trials reached")
    pool.sort(key=lambda x: -x[1])
    stopped = [r for r in ok if r not in [p[0] for p in pool]]
    best, verdict = pool[0], "no runner-up: the only trial in the comparison"
    if len(pool) == 1 and stopped:
        steps = sorted({r["step"] or 0 for r in stopped})
        verdict = (f"no runner-up at the full budget: ASHA stopped the other {len(stopped)} trial(s) at step(s) "
                   f"{', '.join(map(str, steps))}, where their values are not comparable with a final one")
    if len(pool) > 1:
        second = pool[1]
        if any(v != v for v in (best[2], best[3], second[2], second[3])):
            verdict = "no intervals reported: distinguishability unknown"
        elif best[2] <= second[3]:
            verdict = (f"not distinguishable at this evaluation size: the winner's 95% interval "
                       f"[{best[2]:.4f}, {best[3]:.4f}] overlaps the runner-up's ({second[0]['trial']}) "
                       f"[{second[2]:.4f}, {second[3]:.4f}]")
        else:
            verdict = (f"distinguishable: the winner's 95% interval [{best[2]:.4f}, {best[3]:.4f}] lies above the "
                       f"runner-up's ({second[0]['trial']}) [{second[2]:.4f}, {second[3]:.4f}]")
    return best[0], how, verdict


def write_outputs(grid, base: str, base_overrides: list[str], space: Space, out: str, total_steps: int, log=print) -> dict:
    rows, histories = [], {}
    for r in grid:
        sample = (r.config or {}).get("sample", {})
        over = trial_overrides(sample, {})
        m = r.metrics or {}
        trial = m.get("trial_id", "?")
        histories[trial] = _history(r)
        lo, hi = m.get(f"{OBJECTIVE}_lo", float("nan")), m.get(f"{OBJECTIVE}_hi", float("nan"))
        if lo != lo:  # a final report without the interval: the same step's earlier report has it
            same = [h for h in histories[trial] if h[0] == m.get("step") and h[2] == h[2]]
            lo, hi = (same[-1][2], same[-1][3]) if same else (lo, hi)
        rows.append({
            "trial": trial,
            OBJECTIVE: m.get(OBJECTIVE, float("nan")),
            "ci_lo": lo,
            "ci_hi": hi,
            "step": m.get("step"),
            "stopped_early": not r.error and (m.get("step") or 0) < total_steps,
            "chosen": False,
            "evaluations": len(histories[trial]),
            "error": type(r.error).__name__ if r.error else "",
            **{k: override_text(v) for k, v in over.items()},
        })
    best, how, verdict = choose_best(rows, histories, total_steps)
    seeds = max([int((r.metrics or {}).get("seeds") or 1) for r in grid] or [1])
    if seeds > 1:
        how += f"; each value is the mean over {seeds} seeds (train.seed, +1, ...), its interval counting seed variance"
    if best is not None:
        best["chosen"] = True
    rows.sort(key=lambda x: -x[OBJECTIVE] if x[OBJECTIVE] == x[OBJECTIVE] else math.inf)
    keys = list(dict.fromkeys([*RESULT_KEYS, *(k for r in rows for k in r)]))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    storage.write_bytes(storage.join(out, "results.csv"), buf.getvalue().encode())
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        md.append("| " + " | ".join(f"{r.get(k):.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + " |")
    md += ["", f"Chosen: {how}.", f"Verdict: {verdict}." if verdict else ""]
    storage.write_bytes(storage.join(out, "results.md"), ("\n".join(md) + "\n").encode())
    outputs = {"rows": rows, "table": "\n".join(md), "how": how, "verdict": verdict}
    params_keys = [k for k in keys if k not in RESULT_KEYS]
    if best is not None:
        params = {k: best[k] for k in params_keys}
        fixed = {k: override_text(v) for k, v in space.fixed.items()}
        cfg = load_config(base, list(base_overrides) + [f"{k}={v}" for k, v in {**fixed, **params}.items()]
                          + [f"run.name=best-{space.name}"])
        header = (f"# best trial {best['trial']} of sweep {space.name}: {OBJECTIVE}={best[OBJECTIVE]:.4f} "
                  f"[{best['ci_lo']:.4f}, {best['ci_hi']:.4f}] at step {best['step']}\n# chosen: {how}\n# {verdict}\n")
        storage.write_bytes(storage.join(out, "best_config.yaml"), (header + cfg.to_yaml()).encode())
        outputs["best"] = best
    _plot(rows, params_keys, storage.join(out, "objective.png"))
    log("\n".join(md))
    return outputs


def _plot(rows: list[dict], params: list[str], uri: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = params or ["trial"]
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.2), squeeze=False)
    for ax, p in zip(axes[0], params):
        xs, ys, colors, errs = [], [], [], []
        for r in rows:
            lo, hi = r.get("ci_lo", math.nan), r.get("ci_hi", math.nan)
            errs.append((r[OBJECTIVE] - lo, hi - r[OBJECTIVE]) if lo == lo and hi == hi else (0.0, 0.0))
            x = r.get(p)
            try:
                x = float(x)
            except (TypeError, ValueError):
                x = str(x)
            xs.append(x)
            ys.append(r[OBJECTIVE])
            colors.append("tab:red" if r["stopped_early"] else "tab:blue")
        numeric = all(isinstance(x, float) for x in xs)
        cats = [] if numeric else sorted(set(map(str, xs)))
        pos = xs if numeric else [cats.index(str(x)) for x in xs]
        for x, y, c, e, r in zip(pos, ys, colors, errs, rows):
            ax.errorbar([x], [y], yerr=[[e[0]], [e[1]]], fmt="x" if r["stopped_early"] else "o", color=c, capsize=3,
                        mfc="none" if r["stopped_early"] else c)
        if cats:
            ax.set_xticks(range(len(cats)), cats, rotation=30, fontsize=7)
        ax.set_xlabel(p, fontsize=8)
        ax.set_ylabel(OBJECTIVE)
    fig.suptitle("sweep objective with 95% bootstrap intervals (red x: stopped early by ASHA)", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())
