"""``jobs/reproduce.py --design v3``: the pre-registered v3 comparison on real cells (hierdino/presets/repro/v3/base.yaml).

Stages, each resumable (a dataset with a manifest, a run with an export, a finished sweep are kept):
  1. the PBC shards (``--pbc``: shards, or the published folder, cut 0.6/0.2/0.2 as make_shards does),
     its train split cut into fine / coarse / unlabelled parts (``hierdino.data.parts``), the
     leaf-labelled evaluation set, and the synthetic external sets at the default size;
  2. the shared SSL base model on the three parts (labels unused);
  3. variant (d)'s level weights (a sweep on the PBC val split, continuing from the base model);
  4. every variant x seed, continuing from the base model's teacher backbone;
  5. the probes on the PBC test split and the synthetic test splits, the paired contrasts (pooled,
     fine-level classes, per class), OUT/results.{json,md} and plots.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from hierdino import logs, storage
from hierdino.config import load_config, override_text
from hierdino.data import layouts, shards
from hierdino.data.parts import PARTS, assign_parts, part_label
from hierdino.data.suite import EXTERNAL_SETS, ensure_eval_suite
from hierdino.eval.metrics import mistake_severity
from hierdino.experiments import paired
from hierdino.experiments.paired import run_name
from hierdino.experiments.report_v3 import PBC, PBC_FINE
from hierdino.experiments.stages import (
    REPRODUCE,
    calibrate_steps,
    device_name,
    level_weights_d,
    planned_steps,
    train_once,
    train_variants,
    write_results,
)
from hierdino.hierarchy import load_hierarchy
from hierdino.labels import get_label_map
from hierdino.runtime import init_ray

logger = logging.getLogger(__name__)

PREFIX = "repro/v3"
HIERARCHY = "wbc-h2"
COARSE_DEPTH = 3                 # the maturity level: granulocytic_normal_mature, lymphocyte_mature, ...
PART_FRACTIONS = (0.2, 0.4)      # fine, coarse shares of each leaf's train images; the rest unlabelled
PART_SEED = 0
FINE_CLASSES = ("neutrophil_band", "neutrophil_segmented", "metamyelocyte", "myelocyte", "promyelocyte")
VARIANTS = {"ssl": "(a) SSL only", "flat": "(b) flat CE, fine labels", "hxe": "(c) HXE, fine + coarse labels",
            "hxe-fine": "(c0) HXE, fine labels only", "hxe-sweep": "(d) HXE swept level weights, fine + coarse"}
# which dataset carries the coarse part: its labels, or the same images without them
COARSE_DATA = {"ssl": "pbc-coarse", "flat": "pbc-coarse-unlabelled", "hxe": "pbc-coarse",
               "hxe-fine": "pbc-coarse-unlabelled", "hxe-sweep": "pbc-coarse"}
CONTRASTS = (("hxe", "flat"), ("hxe", "hxe-fine"), ("hxe-fine", "flat"), ("hxe-sweep", "hxe"), ("flat", "ssl"),
             ("hxe", "ssl"))
PBC_SPLIT = (0.6, 0.2, 0.2)  # train/val/test of PBC's published folder (seed 0), which has no splits
SYNTH_POOLED = "synthetic pooled"
SYNTH_PROBES = ("knn20",)  # the synthetic sets: a domain-shift check, scored without logreg's C search (budget)
SYNTH_SEEDS = 1            # ... and for the first seed of each variant (features of 3 x 6,100 images per model)


def variant_data(data_dir: str, variant: str) -> list[str]:
    """The training sets of a variant (``data.train``): the three parts, the coarse one with or without labels."""
    return [f"{data_dir}/pbc-fine", f"{data_dir}/{COARSE_DATA[variant]}", f"{data_dir}/pbc-unlabelled"]


def _copy(rows: list[dict], label, split=None) -> list[shards.Record]:
    return [shards.Record(r["image"], r["image_id"], r["source"], r["raw_label"], label(r), split or r["split"]) for r in rows]


def write_parts(pbc: str, data_dir: str) -> dict:
    """OUT/data/pbc-{fine,coarse,coarse-unlabelled,unlabelled} from ``pbc``'s train split, and
    OUT/data/pbc-eval (every split, leaf-labelled rows only); returns and keeps the part counts."""
    summary_path = f"{data_dir}/parts.json"
    if storage.exists(summary_path):
        return json.loads(storage.read_bytes(summary_path))
    h = load_hierarchy(HIERARCHY)
    manifest = shards.read_manifest(pbc)
    rows = shards.read_table(pbc).to_pylist()
    train = [r for r in rows if r["split"] == "train"]
    parts = assign_parts([r["image_id"] for r in train], [r["label"] for r in train], h, PART_FRACTIONS, PART_SEED)
    by_part = {p: [r for r, q in zip(train, parts) if q == p] for p in PARTS}
    kw = dict(hierarchy=HIERARCHY, label_map=manifest.label_map, extra={"hierarchy_tree": h.to_dict()})

    def write(name: str, recs: list[shards.Record]) -> dict:
        m = shards.write_dataset(recs, f"{data_dir}/{name}", name, manifest.source, **kw)
        return m.counts

    counts = {
        "pbc-fine": write("pbc-fine", _copy(by_part["fine"], lambda r: r["label"])),
        "pbc-coarse": write("pbc-coarse", _copy(by_part["coarse"],
                                                lambda r: part_label(r["label"], "coarse", h, COARSE_DEPTH))),
        "pbc-coarse-unlabelled": write("pbc-coarse-unlabelled", _copy(by_part["coarse"], lambda r: None)),
        "pbc-unlabelled": write("pbc-unlabelled", _copy(by_part["unlabelled"], lambda r: None)),
        PBC: write(PBC, _copy([r for r in rows if r["label"] is not None and h.is_leaf(r["label"])], lambda r: r["label"])),
    }
    summary = {"source": pbc, "fractions": {"fine": PART_FRACTIONS[0], "coarse": PART_FRACTIONS[1],
                                            "unlabelled": round(1 - sum(PART_FRACTIONS), 6)},
               "seed": PART_SEED, "coarse_depth": COARSE_DEPTH, "counts": counts}
    storage.write_bytes(summary_path, json.dumps(summary, indent=2).encode())
    for name in ("pbc-fine", "pbc-coarse", "pbc-unlabelled"):
        logger.info(f"{name}: {sum(counts[name]['train'].values())} images, " +
                    ", ".join(f"{k} {v}" for k, v in sorted(counts[name]["train"].items())), extra=REPRODUCE)
    return summary


def pbc_shards(source: str, data_dir: str) -> str:
    """The PBC shards: ``source`` itself when it holds a manifest, else the published folder written
    by make_shards' pbc layout with the design's ``PBC_SPLIT`` (seed 0) into OUT/data/pbc."""
    if storage.exists(storage.join(source, "manifest.json")):
        return source
    out = f"{data_dir}/pbc"
    if not storage.exists(f"{out}/manifest.json"):
        logger.info(f"writing the PBC shards from {source} into {out}", extra=REPRODUCE)
        h = load_hierarchy(layouts.LAYOUTS["pbc"].hierarchy)
        label_map = get_label_map(layouts.source_for("pbc", h.name), h)
        try:  # what `make_shards pbc --root SOURCE --split-fractions 0.6,0.2,0.2 --split-seed 0` writes
            items = layouts.layout_items("pbc", source, label_map, shards.SplitSpec(PBC_SPLIT, 0))
            m = shards.write_items(items, out, "pbc", label_map, hierarchy=h)
        except (ValueError, OSError) as e:
            raise SystemExit(f"reproduce.py: could not read {source} as PBC's published folder: {e}") from e
        logger.info(f"wrote {m.num_images} images of pbc to {out}", extra=REPRODUCE)
    return out


def _subset(pred: dict, keep: np.ndarray) -> dict:
    """A predictions entry (``y_true`` and model -> probe -> predictions) restricted to the rows ``keep``."""
    idx = np.flatnonzero(keep)
    out = {"y_true": [pred["y_true"][i] for i in idx]}
    for model, per_probe in pred.items():
        if model != "y_true":
            out[model] = {p: [v[i] for i in idx] for p, v in per_probe.items()}
    return out


def scored_sets(predictions: dict) -> dict:
    """``predictions`` plus the PBC fine-level classes and each PBC class as sets of their own (their
    bAcc: the mean recall over those classes; one class: its recall)."""
    pbc = predictions[PBC]
    y = np.array(pbc["y_true"])
    out = dict(predictions)
    out[PBC_FINE] = _subset(pbc, np.isin(y, FINE_CLASSES))
    for c in sorted(set(y)):
        out[f"pbc:{c}"] = _subset(pbc, y == c)
    return out


def bacc(y_true, y_pred) -> float:
    """Mean over the classes present in ``y_true`` of their recall (a prediction outside them is an error)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


def _probes_of(sets: dict, d: str) -> list[str]:
    """The probes that scored dataset ``d`` (PBC: all; the synthetic sets: ``SYNTH_PROBES``)."""
    return list(next(v for k, v in sets[d].items() if k != "y_true"))


def _scored_runs(sets: dict, d: str, uris: list[str]) -> list[str]:
    """The runs of ``uris`` that scored dataset ``d`` (every seed on PBC, ``SYNTH_SEEDS`` on the synthetic sets)."""
    return [u for u in uris if run_name(u) in sets[d]]


def variant_table(sets: dict, runs: dict, names: list[str]) -> dict:
    """variant -> dataset -> probe -> per-seed bAcc (PBC, its fine classes, the synthetic sets)."""
    return {v: {d: {p: [bacc(sets[d]["y_true"], sets[d][run_name(u)][p]) for u in _scored_runs(sets, d, uris)]
                    for p in _probes_of(sets, d)} for d in names} for v, uris in runs.items()}


def variant_steps(args, common: list[str], base_steps: int, data: list[str]) -> int:
    """Steps of every variant: ``--steps``, else those of an earlier start (OUT/plan.json), else what fits
    ``--time-budget-min`` (a timed run of (c); the base model counts as base_steps / 300 runs), else the
    design's 300; kept in OUT/plan.json before any variant trains."""
    def calibrate() -> int:
        n_runs = len(args.variants) * len(args.seeds) + (0 if args.level_weights else args.sweep_trials / 2) + base_steps / 300
        return calibrate_steps(args, common + [f"data.train={override_text(data)}"], n_runs, preset=f"{PREFIX}/hxe")
    steps, _ = planned_steps(args, calibrate, f"{PREFIX}/base", common)
    storage.write_bytes(str(Path(args.out, "plan.json")), json.dumps({"steps": steps, "base_steps": base_steps}).encode())
    return steps


def _stage_runs(args, common: list[str], data_dir: str) -> tuple[str, int, list[float] | None, dict]:
    """The base model (URI, steps), (d)'s level weights and every variant x seed's run (each skipped when done)."""
    base_steps = args.base_steps or load_config(f"{PREFIX}/pretrain", common).train.steps
    args.steps = variant_steps(args, common, base_steps, variant_data(data_dir, "hxe"))
    base_uri = train_once(f"{PREFIX}/pretrain", common + [f"data.train={override_text(variant_data(data_dir, 'ssl'))}",
                                                          f"train.steps={base_steps}", f"checkpoint.every_steps={base_steps}",
                                                          "run.name=base"])
    warmup = min(load_config(f"{PREFIX}/base", common).optim.warmup_steps, max(1, args.steps // 5))
    common = common + [f"train.steps={args.steps}", f"checkpoint.every_steps={max(1, args.steps // 2)}",
                       f"optim.warmup_steps={warmup}",  # short continuations: a fifth of the steps at most
                       f"model.init_weights={storage.join(base_uri, 'export', 'teacher_backbone.safetensors')}"]
    level_weights = None
    if "hxe-sweep" in args.variants:
        level_weights = level_weights_d(args, common + [f"data.train={override_text(variant_data(data_dir, 'hxe-sweep'))}"],
                                         preset=f"{PREFIX}/hxe-sweep")
    runs = train_variants(args, common, level_weights, prefix=PREFIX,
                          per_variant=lambda v: [f"data.train={override_text(variant_data(data_dir, v))}"])
    return base_uri, base_steps, level_weights, runs


def _evaluate(args, models: list[str], synth_models: list[str], data_dir: str, eval_suite: str, probes,
              center: float) -> dict:
    """Probes on the PBC test split (the run's centre crop) and ``SYNTH_PROBES`` of ``synth_models`` on
    the synthetic test splits (whole images)."""
    from hierdino.eval.report import evaluate

    kw = dict(split="test", bootstrap_n=args.bootstrap, plots=False, keep_predictions=True, in_process=True)
    with logs.quiet():
        pbc = evaluate(models, [f"{data_dir}/{PBC}"], f"{args.out}/report-pbc", probes=probes, center_crop=center, **kw)
        synth = evaluate(synth_models, [f"{eval_suite}/{d}" for d in EXTERNAL_SETS], f"{args.out}/report-synthetic",
                         probes=SYNTH_PROBES, **kw)
    return {"rows": pbc["rows"] + synth["rows"], "predictions": pbc["predictions"] | synth["predictions"],
            "datasets": pbc["datasets"] | synth["datasets"]}


def _tree_rho(rows: list[dict], runs: dict) -> dict:
    """variant -> dataset -> per-seed Spearman correlation of feature distance with tree distance."""
    rho = {(r["model"], r["dataset"]): r["tree_feature_spearman"] for r in rows}
    return {v: {d: [rho[(run_name(u), d)] for u in uris if (run_name(u), d) in rho] for d in (PBC, *EXTERNAL_SETS)}
            for v, uris in runs.items()}


def summarise_v3(args, results: dict, runs: dict, base_uri: str, arch: str, probes, level_weights, parts: dict,
                 setup: dict) -> dict:
    """results.json's content: setup, parts, base vs random, the variant table, paired contrasts."""
    sets = scored_sets(results["predictions"])
    names = [PBC, PBC_FINE, *EXTERNAL_SETS]
    trees = {d: load_hierarchy(results["datasets"][d]["hierarchy"]) for d in (PBC, *EXTERNAL_SETS)}
    trees |= {d: trees[PBC] for d in sets if d.startswith("pbc:") or d == PBC_FINE}

    def contrasts(groups: dict, probes_here, severity: bool, runs_here=runs) -> list[dict]:
        return paired.paired_contrasts(sets, runs_here, probes_here, CONTRASTS, args.bootstrap,
                                       hierarchies=trees if severity else None, groups=groups)

    synth_runs = {v: uris[:SYNTH_SEEDS] for v, uris in runs.items()}
    rows = (contrasts({PBC: (PBC,), PBC_FINE: (PBC_FINE,)}, probes, True)
            + contrasts({**{d: (d,) for d in EXTERNAL_SETS}, SYNTH_POOLED: EXTERNAL_SETS}, SYNTH_PROBES, True, synth_runs))
    per_class = contrasts({d: (d,) for d in sets if d.startswith("pbc:")}, (probes[-1],), False)
    who = (("base", run_name(base_uri)), ("random", f"random-{arch}"))
    base = {w: {d: {p: bacc(sets[d]["y_true"], sets[d][name][p]) for p in _probes_of(sets, d)} for d in names}
            for w, name in who}
    severity = {v: {d: [mistake_severity(sets[d]["y_true"], sets[d][run_name(u)][_probes_of(sets, d)[-1]],
                                         trees[d])[0] for u in _scored_runs(sets, d, uris)] for d in names}
                for v, uris in runs.items()}
    return {"design": "v3", "setup": setup, "probes": list(probes), "variants": {v: VARIANTS[v] for v in runs},
            "runs": runs, "level_weights": level_weights, "parts": parts, "base": base,
            "bacc": variant_table(sets, runs, names), "severity": severity, "tree_rho": _tree_rho(results["rows"], runs),
            "test_images": {d: len(sets[d]["y_true"]) for d in names}, "paired": rows, "paired_per_class": per_class,
            "hours": (time.time() - args.t0) / 3600}


def reproduce(args, probes) -> int:
    """Run the v3 design end to end; writes OUT/results.json, results.md and plots/."""
    if not args.pbc:
        raise SystemExit("reproduce.py --design v3: give --pbc (PBC_dataset_normal_DIB, or shards made from it)")
    data_dir = f"{args.out}/data"
    pbc = pbc_shards(args.pbc, data_dir)
    parts = write_parts(pbc, data_dir)
    cfg = load_config(f"{PREFIX}/base")
    eval_suite = ensure_eval_suite(str(Path(cfg.data.synth_cache).expanduser()), "default", cfg.data.image_size)
    init_ray(verbose=args.verbose)
    common = [f"run.storage={args.out}", f"eval.datasets=[{data_dir}/{PBC}]"]
    base_uri, base_steps, level_weights, runs = _stage_runs(args, common, data_dir)
    t_eval = time.time()
    fixed = [base_uri, f"random:{cfg.model.arch}@{cfg.data.image_size}"]
    models = fixed + [u for uris in runs.values() for u in uris]
    synth_models = fixed + [u for uris in runs.values() for u in uris[:SYNTH_SEEDS]]
    results = _evaluate(args, models, synth_models, data_dir, eval_suite, probes, cfg.data.center_crop)
    logger.info(f"evaluation in {time.time() - t_eval:.0f}s", extra=REPRODUCE)
    setup = {"arch": cfg.model.arch, "image_size": cfg.data.image_size, "center_crop": cfg.data.center_crop,
             "steps": args.steps, "base_steps": base_steps, "batch_size": cfg.train.batch_size, "seeds": args.seeds,
             "device": device_name(cfg), "bootstrap": args.bootstrap, "eval_suite": eval_suite, "pbc": pbc,
             "level_weights_source": "given with --level-weights" if args.level_weights else "from the val-split sweep"}
    summary = summarise_v3(args, results, runs, base_uri, cfg.model.arch, probes, level_weights, parts, setup)
    return write_results(args, summary, probes)
