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
from hierdino.data import storage

OBJECTIVE = "ext_val_bacc"
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
    """The function trainable: one short pretrain with the trial's overrides."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from hierdino.train.launch import build_trainer

    ctx = tune.get_context()
    over = trial_overrides(config["sample"], config["fixed"])
    overrides = list(config["base_overrides"]) + [f"{k}={override_text(v)}" for k, v in over.items()] + [
        f"run.storage={config['trials_dir']}", f"run.name={ctx.get_trial_id()}"]
    cfg = load_config(config["base"], overrides)
    trainer = build_trainer(cfg, log=lambda *_: None, callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error:
        raise result.error
    final = result.return_value or {}
    if OBJECTIVE in final:  # normally already reported at the last step; ASHA ends trials at max_t
        tune.report({OBJECTIVE: final[OBJECTIVE], "step": final.get("step")})


def run_sweep(base: str, space_path: str, trials: int, out: str, scheduler: str = "asha", max_concurrent: int = 1,
              base_overrides: list[str] | None = None, log=print) -> dict:
    """Run (or resume) a sweep under ``out``; writes results.csv/.md, best_config.yaml and objective.png."""
    from ray import tune

    space = load_space(space_path)
    base_overrides = list(base_overrides or [])
    cfg = load_config(base, base_overrides)
    if not cfg.eval.every_steps:
        base_overrides.append(f"eval.every_steps={max(1, cfg.train.steps // 4)}")
    base_overrides.append("eval.split=val")
    base_overrides.append("eval.at_end=false")
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
    param_space = {"sample": space.tune_space(levels), "fixed": space.fixed, "base": base,
                   "base_overrides": base_overrides, "trials_dir": storage.join(out_path, "trials")}
    # A trial driver only waits on its TorchTrainer: it holds no CPU (a bundle needs some resource,
    # hence 1 MiB of memory). Even 0.01 CPU left the trial's Ray Data unable to start on 2 CPUs.
    trainable = tune.with_resources(_trial, {"cpu": 0, "memory": 2 ** 20})
    exp_dir = storage.join(out_path, "tune")
    if tune.Tuner.can_restore(storage.join(exp_dir, space.name)):
        log(f"[hierdino] resuming the sweep in {exp_dir}/{space.name}")
        tuner = tune.Tuner.restore(storage.join(exp_dir, space.name), trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=OBJECTIVE, mode="max", num_samples=trials, scheduler=sched,
                                        max_concurrent_trials=max_concurrent),
            run_config=tune.RunConfig(name=space.name, storage_path=exp_dir),
        )
    grid = tuner.fit()
    return write_outputs(grid, base, base_overrides, space, out_path, cfg.train.steps, log)


def write_outputs(grid, base: str, base_overrides: list[str], space: Space, out: str, total_steps: int, log=print) -> dict:
    rows = []
    for r in grid:
        sample = (r.config or {}).get("sample", {})
        over = trial_overrides(sample, {})
        hist = r.metrics_dataframe
        best_step = None if hist is None or OBJECTIVE not in hist else hist[OBJECTIVE].dropna()
        rows.append({
            "trial": (r.metrics or {}).get("trial_id", "?"),
            OBJECTIVE: (r.metrics or {}).get(OBJECTIVE, float("nan")),
            "step": (r.metrics or {}).get("step"),
            "stopped_early": not r.error and ((r.metrics or {}).get("step") or 0) < total_steps,
            "evaluations": 0 if best_step is None else int(len(best_step)),
            "error": type(r.error).__name__ if r.error else "",
            **{k: override_text(v) for k, v in over.items()},
        })
    rows.sort(key=lambda x: -x[OBJECTIVE] if x[OBJECTIVE] == x[OBJECTIVE] else math.inf)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    storage.write_bytes(storage.join(out, "results.csv"), buf.getvalue().encode())
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        md.append("| " + " | ".join(f"{r.get(k):.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + " |")
    storage.write_bytes(storage.join(out, "results.md"), ("\n".join(md) + "\n").encode())
    best = next((r for r in rows if r[OBJECTIVE] == r[OBJECTIVE] and not r["error"]), None)
    outputs = {"rows": rows, "table": "\n".join(md)}
    if best is not None:
        params = {k: best[k] for k in keys if k not in ("trial", OBJECTIVE, "step", "stopped_early", "evaluations", "error")}
        fixed = {k: override_text(v) for k, v in space.fixed.items()}
        cfg = load_config(base, list(base_overrides) + [f"{k}={v}" for k, v in {**fixed, **params}.items()]
                          + [f"run.name=best-{space.name}"])
        header = f"# best trial {best['trial']} of sweep {space.name}: {OBJECTIVE}={best[OBJECTIVE]:.4f}\n"
        storage.write_bytes(storage.join(out, "best_config.yaml"), (header + cfg.to_yaml()).encode())
        outputs["best"] = best
    _plot(rows, [k for k in keys if k not in ("trial", OBJECTIVE, "step", "stopped_early", "evaluations", "error")],
          storage.join(out, "objective.png"))
    log("\n".join(md))
    return outputs


def _plot(rows: list[dict], params: list[str], uri: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = params or ["trial"]
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.2), squeeze=False)
    for ax, p in zip(axes[0], params):
        xs, ys, colors = [], [], []
        for r in rows:
            x = r.get(p)
            try:
                x = float(x)
            except (TypeError, ValueError):
                x = str(x)
            xs.append(x)
            ys.append(r[OBJECTIVE])
            colors.append("tab:red" if r["stopped_early"] else "tab:blue")
        if all(isinstance(x, float) for x in xs):
            ax.scatter(xs, ys, c=colors)
        else:
            cats = sorted(set(map(str, xs)))
            ax.scatter([cats.index(str(x)) for x in xs], ys, c=colors)
            ax.set_xticks(range(len(cats)), cats, rotation=30, fontsize=7)
        ax.set_xlabel(p, fontsize=8)
        ax.set_ylabel(OBJECTIVE)
    fig.suptitle("sweep objective (red: stopped early by ASHA)", fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())
