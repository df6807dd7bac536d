"""Reporting a finished sweep: one result row per trial, the choice of the best trial (and whether it
is distinguishable from the runner-up), and the files under the sweep's output folder:
``results.csv``, ``results.md``, ``best_config.yaml`` and ``objective.png``.
"""

from __future__ import annotations

import csv
import io
import math
import re

from hierdino import storage
from hierdino.config import load_config, override_text
from hierdino.eval import OBJECTIVE
from hierdino.eval.plots import pyplot, save_png
from hierdino.tune.space import Space, trial_overrides

RESULT_KEYS = ("trial", OBJECTIVE, "ci_lo", "ci_hi", "step", "stopped_early", "chosen", "evaluations", "error")


def trial_history(result) -> list[tuple[int, float, float, float]]:
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


def result_row(result, history: list, total_steps: int) -> dict:
    """One trial's row: its last objective with its interval, how far it trained, and its parameters."""
    over = trial_overrides((result.config or {}).get("sample", {}), {})
    m = result.metrics or {}
    lo, hi = m.get(f"{OBJECTIVE}_lo", math.nan), m.get(f"{OBJECTIVE}_hi", math.nan)
    if lo != lo:  # a final report without the interval: the same step's earlier report has it
        same = [h for h in history if h[0] == m.get("step") and h[2] == h[2]]
        lo, hi = (same[-1][2], same[-1][3]) if same else (lo, hi)
    return {
        "trial": m.get("trial_id", "?"),
        OBJECTIVE: m.get(OBJECTIVE, math.nan),
        "ci_lo": lo,
        "ci_hi": hi,
        "step": m.get("step"),
        "stopped_early": not result.error and (m.get("step") or 0) < total_steps,
        "chosen": False,
        "evaluations": len(history),
        "error": error_text(result.error) if result.error else "",
        **{k: override_text(v) for k, v in over.items()},
    }


def error_text(e: BaseException) -> str:
    """A trial's error in one line: the innermost ``SomeError: message`` line of its text (Ray wraps
    a trial's own error, e.g. ``NonFiniteLossError: ... at step 3``, in its task and worker errors)."""
    said = [line.strip() for line in str(e).splitlines() if re.match(r"^[\w.]*(Error|Exception)\b[^:]*: ", line.strip())]
    return (said[-1] if said else type(e).__name__).replace("|", "/")[:200]


def result_rows(grid, total_steps: int) -> tuple[list[dict], dict[str, list]]:
    """Every trial's row, and its reported history keyed by trial id."""
    rows, histories = [], {}
    for r in grid:
        trial = (r.metrics or {}).get("trial_id", "?")
        histories[trial] = trial_history(r)
        rows.append(result_row(r, histories[trial], total_steps))
    return rows, histories


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
    pool, how = _comparison_pool(ok, histories, total_steps)
    pool.sort(key=lambda x: -x[1])
    return pool[0][0], how, _verdict(pool, ok)


def _comparison_pool(ok: list[dict], histories: dict[str, list], total_steps: int) -> tuple[list[tuple], str]:
    """(row, objective, lo, hi) of the trials that compete, and how they were picked."""
    full = [r for r in ok if (r["step"] or 0) >= total_steps]
    if full:
        pool = [(r, r[OBJECTIVE], r["ci_lo"], r["ci_hi"]) for r in full]
        return pool, f"best {OBJECTIVE} among the {len(full)} trial(s) that reached the full budget ({total_steps} steps)"
    common = min(r["step"] or 0 for r in ok)
    pool = []
    for r in ok:
        at = [h for h in histories.get(r["trial"], []) if h[0] <= common]
        if at:
            pool.append((r, *at[-1][1:]))
    return pool, (f"no trial reached the full budget ({total_steps} steps): best {OBJECTIVE} at step {common}, "
                  f"the largest step all {len(ok)} trials reached")


def _verdict(pool: list[tuple], ok: list[dict]) -> str:
    """Whether the winner (``pool[0]``, sorted best first) is distinguishable from the runner-up."""
    best = pool[0]
    if len(pool) == 1:
        stopped = [r for r in ok if r not in [p[0] for p in pool]]
        if not stopped:
            return "no runner-up: the only trial in the comparison"
        steps = sorted({r["step"] or 0 for r in stopped})
        return (f"no runner-up at the full budget: ASHA stopped the other {len(stopped)} trial(s) at step(s) "
                f"{', '.join(map(str, steps))}, where their values are not comparable with a final one")
    second = pool[1]
    if any(v != v for v in (best[2], best[3], second[2], second[3])):
        return "no intervals reported: distinguishability unknown"
    if best[2] <= second[3]:
        return (f"not distinguishable at this evaluation size: the winner's 95% interval "
                f"[{best[2]:.4f}, {best[3]:.4f}] overlaps the runner-up's ({second[0]['trial']}) "
                f"[{second[2]:.4f}, {second[3]:.4f}]")
    return (f"distinguishable: the winner's 95% interval [{best[2]:.4f}, {best[3]:.4f}] lies above the "
            f"runner-up's ({second[0]['trial']}) [{second[2]:.4f}, {second[3]:.4f}]")


def csv_text(rows: list[dict], keys: list[str]) -> str:
    """The rows as CSV with the header ``keys``."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def markdown_lines(rows: list[dict], keys: list[str], how: str, verdict: str) -> list[str]:
    """The rows as a Markdown table (floats to 4 places), then how the winner was chosen and the verdict."""
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        md.append("| " + " | ".join(f"{r.get(k):.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys) + " |")
    return md + ["", f"Chosen: {how}.", f"Verdict: {verdict}." if verdict else ""]


def write_best_config(best: dict, params_keys: list[str], how: str, verdict: str, base: str,
                      base_overrides: list[str], space: Space, out: str) -> None:
    """``best_config.yaml``: the full config of the winner, headed by its score and how it was chosen."""
    params = {k: best[k] for k in params_keys}
    fixed = {k: override_text(v) for k, v in space.fixed.items()}
    cfg = load_config(base, list(base_overrides) + [f"{k}={v}" for k, v in {**fixed, **params}.items()]
                      + [f"run.name=best-{space.name}"])
    header = (f"# best trial {best['trial']} of sweep {space.name}: {OBJECTIVE}={best[OBJECTIVE]:.4f} "
              f"[{best['ci_lo']:.4f}, {best['ci_hi']:.4f}] at step {best['step']}\n# chosen: {how}\n# {verdict}\n")
    storage.write_bytes(storage.join(out, "best_config.yaml"), (header + cfg.to_yaml()).encode())


def write_outputs(grid, base: str, base_overrides: list[str], space: Space, out: str, total_steps: int) -> dict:
    """Write the sweep's tables, best config and plot under ``out``; returns the rows, the Markdown
    table (``table``: what the sweep command prints), how the winner was chosen, the verdict and (if
    any) the best row."""
    rows, histories = result_rows(grid, total_steps)
    best, how, verdict = choose_best(rows, histories, total_steps)
    seeds = max([int((r.metrics or {}).get("seeds") or 1) for r in grid] or [1])
    if seeds > 1:
        how += f"; each value is the mean over {seeds} seeds (train.seed, +1, ...), its interval counting seed variance"
    if best is not None:
        best["chosen"] = True
    rows.sort(key=lambda x: -x[OBJECTIVE] if x[OBJECTIVE] == x[OBJECTIVE] else math.inf)
    keys = list(dict.fromkeys([*RESULT_KEYS, *(k for r in rows for k in r)]))
    storage.write_bytes(storage.join(out, "results.csv"), csv_text(rows, keys).encode())
    md = markdown_lines(rows, keys, how, verdict)
    storage.write_bytes(storage.join(out, "results.md"), ("\n".join(md) + "\n").encode())
    outputs = {"rows": rows, "table": "\n".join(md), "how": how, "verdict": verdict}
    params_keys = [k for k in keys if k not in RESULT_KEYS]
    if best is not None:
        write_best_config(best, params_keys, how, verdict, base, base_overrides, space, out)
        outputs["best"] = best
    plot_objective(rows, params_keys, storage.join(out, "objective.png"))
    return outputs


def plot_objective(rows: list[dict], params: list[str], uri: str) -> None:
    """``objective.png``: the objective with its 95% interval against each parameter, one panel each."""
    plt = pyplot()
    params = params or ["trial"]
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.2), squeeze=False)
    for ax, p in zip(axes[0], params):
        _plot_parameter(ax, rows, p)
    fig.suptitle("sweep objective with 95% bootstrap intervals (red x: stopped early by ASHA)", fontsize=9)
    save_png(fig, uri, dpi=100)
    plt.close(fig)


def _plot_parameter(ax, rows: list[dict], p: str) -> None:
    """One panel: each trial's objective against parameter ``p`` (categories if not all numbers)."""
    xs = []
    for r in rows:
        try:
            xs.append(float(r.get(p)))
        except (TypeError, ValueError):
            xs.append(str(r.get(p)))
    numeric = all(isinstance(x, float) for x in xs)
    cats = [] if numeric else sorted(set(map(str, xs)))
    pos = xs if numeric else [cats.index(str(x)) for x in xs]
    for x, r in zip(pos, rows):
        lo, hi = r.get("ci_lo", math.nan), r.get("ci_hi", math.nan)
        e = (r[OBJECTIVE] - lo, hi - r[OBJECTIVE]) if lo == lo and hi == hi else (0.0, 0.0)
        c = "tab:red" if r["stopped_early"] else "tab:blue"
        ax.errorbar([x], [r[OBJECTIVE]], yerr=[[e[0]], [e[1]]], fmt="x" if r["stopped_early"] else "o", color=c,
                    capsize=3, mfc="none" if r["stopped_early"] else c)
    if cats:
        ax.set_xticks(range(len(cats)), cats, rotation=30, fontsize=7)
    ax.set_xlabel(p, fontsize=8)
    ax.set_ylabel(OBJECTIVE)
