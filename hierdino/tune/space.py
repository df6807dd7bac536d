"""The search-space file format of ``tune_spaces/*.yaml``: reading, validating against the config,
and turning a space into Tune's sampling domains and a trial's sample into config overrides.

A search space is YAML::

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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hierdino import storage
from hierdino.config import ConfigError, load_config, override_text
from hierdino.errors import UserError
from hierdino.hierarchy import load_hierarchy

DISTS = {"uniform": ("low", "high"), "loguniform": ("low", "high"), "randint": ("low", "high"),
         "choice": ("values",), "grid": ("values",), "level_weights": ("low", "high")}


class SpaceError(UserError, ValueError):
    """A search-space file that cannot be used; the message names the file, parameter and field."""

    kind = "sweep space"


@dataclass
class Space:
    name: str
    params: dict[str, dict]
    fixed: dict[str, object] = field(default_factory=dict)
    source: str = "<memory>"

    def tune_space(self, levels: int) -> dict:
        """Tune's sampling domain per parameter (``level_weights``: one ``key@level`` per level)."""
        from ray import tune  # Ray is heavy and only the sweep driver needs its domains

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
        _check_param(f"{path}: params.{key}", key, p)
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise SpaceError(f"{path}: 'fixed' must map config keys to values (e.g. loss.supervised.kind: hxe), got {fixed!r}")
    name = str(data.get("name") or path.stem)
    problem = storage.name_problem(name)  # the sweep's directory under the Tune experiment path
    if problem:
        raise SpaceError(f"{path}: name {name!r} {problem}")
    return Space(name, dict(data["params"]), dict(fixed), str(path))


def _check_param(where: str, key: str, p) -> None:
    """One ``params`` entry: a known dist with exactly its fields, and values that dist can sample."""
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
        return
    lo, hi = p["low"], p["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or not lo < hi:
        raise SpaceError(f"{where}: needs numbers low < high, got low={lo!r} high={hi!r}")
    if d == "loguniform" and lo <= 0:
        raise SpaceError(f"{where}: loguniform needs low > 0 (log scale), got {lo}")
    if d == "level_weights" and lo < 0:
        raise SpaceError(f"{where}: level weights must be >= 0, got low={lo}")
    if d == "level_weights" and key != "loss.supervised.level_weights":
        raise SpaceError(f"{where}: dist level_weights only applies to loss.supervised.level_weights")


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
    if "loss.supervised.alpha" in space.params and any(p["dist"] == "level_weights" for p in space.params.values()):
        raise SpaceError(f"{space.source}: params loss.supervised.alpha and level_weights exclude each other "
                         "(sampled level weights replace alpha's); sweep one of them")
    for key, p in space.params.items():
        probes = _probe_values(p)
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


def _probe_values(p: dict) -> list:
    """Values a parameter's trials can take, to try against the config: every listed value; a
    range's bounds and, for ``uniform``/``loguniform``, a value between them that is not a whole
    number (an integer key refuses it); every integer of a ``randint`` range (a few hundred at most,
    so divisibility rules are met by all of them)."""
    d = p["dist"]
    if d in ("choice", "grid"):
        return list(p["values"])
    if d == "level_weights":
        return []
    lo, hi = p["low"], p["high"]
    if d == "randint":
        return list(range(int(lo), int(hi) + 1)) if hi - lo <= 256 else [lo, hi, (lo + hi) // 2, (lo + hi) // 2 + 1]
    return [lo, hi, lo + (hi - lo) * 0.3719]


def load_hierarchy_depth(name: str) -> int:
    """How many levels the named hierarchy has (one ``level_weights`` entry each)."""
    return load_hierarchy(name).max_depth
