"""The synthetic benchmark suite: six datasets whose structure makes the paper's question testable.

- ``synth-fine``: leaf labels, domain A (like Matek / Acevedo);
- ``synth-coarse``: labels only at internal nodes (``neutrophil``, ``lymphocyte_mature``, lineages ...),
  domain B (like Raabin);
- ``synth-unlabeled``: no labels, domain C;
- ``synth-ext-1``, ``synth-ext-2``: external blood sets in unseen domains, leaf labels over a subset
  of classes, train/val/test splits for probes;
- ``synth-ood``: out-of-domain cervical-like cytology with its own tree (``synth-ood.yaml``).

Class frequencies are skewed (seeded log-normal, some classes rare) as in real hematology sets, with a
floor per split of the external sets (``MIN_PER_CLASS``): every class has at least 20 probe-training
images, the k of the kNN-20 probe. With fewer (the first suites had 4), a class can never win a
20-neighbour vote, whatever the features, and kNN-20 balanced accuracy measures the class sizes
rather than the backbone. Real sets' rare classes (basophils in Matek, 79) are above that floor too.
Sizes: ``small`` = 6,400 images (builds in well under a minute on 2 cores at 64 px), ``default`` =
48,000 images (the benchmark size).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hierdino import storage
from hierdino.config.schema import EXTERNAL_SETS  # the default of eval.datasets
from hierdino.data import shards
from hierdino.data.shards import Record
from hierdino.data.synth import DOMAINS, render_encoded
from hierdino.hierarchy import load_hierarchy
from hierdino.logs import PLAIN

logger = logging.getLogger(__name__)

# Internal nodes a coarse-labelled set uses; a leaf is labelled with its nearest such ancestor.
COARSE_NODES = ("neutrophil", "lymphocyte_mature", "lymphoid_immature", "eosinophil_group", "granulocytic_immature",
                "erythroid_immature", "monopoiesis", "granulopoiesis", "artefact", "unassigned_blast", "thrombopoiesis")
EXT1_CLASSES = ("neutrophil_segmented", "neutrophil_band", "eosinophil", "basophil", "lymphocyte_typical", "monocyte",
                "metamyelocyte", "myelocyte", "promyelocyte", "erythroblast", "platelet")
EXT2_CLASSES = ("myeloblast", "promyelocyte", "myelocyte", "metamyelocyte", "neutrophil_band", "neutrophil_segmented",
                "eosinophil", "lymphocyte_typical", "plasma_cell", "erythroblast", "proerythroblast", "monocyte",
                "hairy_cell", "blast")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    hierarchy: str
    domain: str
    classes: tuple | None      # leaves drawn from (None = all leaves of the hierarchy)
    labels: str                # leaf | coarse | none
    splits: tuple              # (train, val, test) fractions
    sizes: dict                # size name -> number of images


SUITE = (
    DatasetSpec("synth-fine", "wbc-h1", "A", None, "leaf", (1.0, 0, 0), {"small": 1600, "default": 12000}),
    DatasetSpec("synth-coarse", "wbc-h1", "B", None, "coarse", (1.0, 0, 0), {"small": 1200, "default": 9000}),
    DatasetSpec("synth-unlabeled", "wbc-h1", "C", None, "none", (1.0, 0, 0), {"small": 1200, "default": 9000}),
    # default size: >= 1,500 test images per external set (the power of the v2 reproduction, issue #16)
    DatasetSpec("synth-ext-1", "wbc-h1", "ext-1", EXT1_CLASSES, "leaf", (0.5, 0.25, 0.25), {"small": 800, "default": 6100}),
    DatasetSpec("synth-ext-2", "wbc-h1", "ext-2", EXT2_CLASSES, "leaf", (0.5, 0.25, 0.25), {"small": 800, "default": 6100}),
    DatasetSpec("synth-ood", "synth-ood", "ood", None, "leaf", (0.5, 0.25, 0.25), {"small": 800, "default": 6100}),
)
SUITE_NAMES = tuple(s.name for s in SUITE)
TRAIN_SETS = ("synth-fine", "synth-coarse", "synth-unlabeled")
# Fewest images of a class in each split of an external set (training sets: 1).
MIN_PER_CLASS = {"train": 20, "val": 10, "test": 10}
# Written into every manifest; a cached suite of another version is rebuilt (2: plan() changed;
# 3: same images, manifests that list each shard's row groups for the ingest's first task).
SUITE_VERSION = 3


def class_frequencies(n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Skewed class probabilities: log-normal weights, a quarter of the classes made rare."""
    w = np.exp(rng.normal(0, 0.6, n_classes))
    rare = rng.choice(n_classes, size=max(1, n_classes // 4), replace=False)
    w[rare] *= 0.2
    return w / w.sum()


def plan(spec: DatasetSpec, size: str, seed: int) -> list[tuple[str, str, str | None, int]]:
    """(split, leaf, label, image seed) for every image of ``spec``; each class has at least
    ``MIN_PER_CLASS[split]`` images in each split of an external set."""
    h = load_hierarchy(spec.hierarchy)
    classes = list(spec.classes or h.leaves)
    rng = np.random.default_rng([seed, sum(map(ord, spec.name))])
    freq = class_frequencies(len(classes), rng)
    total = spec.sizes[size]
    rows = []
    for split, frac in zip(shards.SPLITS, spec.splits):
        if frac == 0:
            continue
        counts = np.maximum(MIN_PER_CLASS[split] if frac < 1 else 1, np.round(freq * total * frac)).astype(int)
        for cls, k in zip(classes, counts):
            for _ in range(k):
                rows.append((split, cls))
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    seeds = rng.integers(0, 2 ** 63 - 1, len(rows))
    out = []
    for (split, leaf), s in zip(rows, seeds):
        if spec.labels == "leaf":
            label = leaf
        elif spec.labels == "coarse":
            label = next(a for a in [leaf] + h.ancestors(leaf) if a in COARSE_NODES)
        else:
            label = None
        out.append((split, leaf, label, int(s)))
    return out


def _render_chunk(args) -> list[bytes]:
    hierarchy, domain, size, items = args
    h = load_hierarchy(hierarchy)
    return [render_encoded(h, leaf, DOMAINS[domain], size, np.random.default_rng(s)) for leaf, s in items]


def _records(spec: DatasetSpec, rows, image_size: int, pool) -> "list[Record]":
    chunk = 200
    jobs = [(spec.hierarchy, spec.domain, image_size, [(leaf, s) for _, leaf, _, s in rows[i:i + chunk]])
            for i in range(0, len(rows), chunk)]
    results = pool.imap(_render_chunk, jobs) if pool else map(_render_chunk, jobs)
    i = 0
    for images in results:
        for img in images:
            split, leaf, label, _ = rows[i]
            yield Record(img, f"{spec.name}-{i:07d}", spec.name, label, label, split)
            i += 1


def build_suite(out: str, size: str = "small", image_size: int = 64, seed: int = 0, workers: int | None = None,
                names: tuple = SUITE_NAMES, options: storage.StorageOptions | None = None,
                target_file_mb: float = 64.0) -> dict[str, shards.Manifest]:
    """Render and write the suite under ``out/<name>/``; returns the manifests."""
    unknown = set(names) - set(SUITE_NAMES)
    if unknown:
        raise ValueError(f"unknown synthetic dataset(s) {sorted(unknown)}; the suite has {SUITE_NAMES}")
    if size not in ("small", "default"):
        raise ValueError(f"size must be small or default, got {size!r}")
    workers = workers or max(1, min(mp.cpu_count(), 8))
    manifests = {}
    ctx = mp.get_context("spawn") if workers > 1 else None
    pool = ctx.Pool(workers) if ctx else None
    try:
        for spec in SUITE:
            if spec.name not in names:
                continue
            t0 = time.time()
            rows = plan(spec, size, seed)
            m = shards.write_dataset(
                _records(spec, rows, image_size, pool), storage.join(out, spec.name), spec.name, spec.name,
                label_map={"source": spec.name, "mapping": "identity (node names)"}, hierarchy=spec.hierarchy,
                target_file_mb=target_file_mb, options=options,
                extra={"synthetic": True, "domain": spec.domain, "image_size": image_size, "seed": seed, "size": size,
                       "suite_version": SUITE_VERSION},
            )
            dt = time.time() - t0
            logger.info(f"  {spec.name:16s} {m.num_images:6d} images in {dt:5.1f}s "
                        f"({m.num_images / max(dt, 1e-9):.0f} img/s)", extra=PLAIN)
            manifests[spec.name] = m
    finally:
        if pool:
            pool.close()
            pool.join()
    return manifests


def suite_ready(out: str, names: tuple = SUITE_NAMES, options: storage.StorageOptions | None = None) -> bool:
    """Every dataset of ``names`` is complete under ``out`` and was built by this version's plan."""
    for n in names:
        uri = storage.join(out, n)
        if not storage.exists(storage.join(uri, "manifest.json"), options):
            return False
        if shards.read_manifest(uri, options).extra.get("suite_version") != SUITE_VERSION:
            return False
    return True


def resolve_dataset(name_or_uri: str, suite_dir: str) -> str:
    """A suite name (``synth-ext-1``) -> ``<suite_dir>/<name>``; URIs and paths pass through."""
    return storage.join(suite_dir, name_or_uri) if name_or_uri in SUITE_NAMES else name_or_uri


def suite_dir(cfg) -> str:
    """``data.synth_cache`` as it is read: a local path with ``~`` expanded, an S3 URI as it is."""
    c = cfg.data.synth_cache
    return c if storage.is_s3(c) else os.path.expanduser(c)


TRAINING_SETS = "train"  # in eval.datasets: the run's own training sets (data.train), scored on their eval.split


def eval_set_uris(cfg) -> list[str]:
    """The URIs of ``eval.datasets``: suite names under ``suite_dir``, ``train`` for the sets of
    ``data.train`` (a real dataset's own val/test split: the ``pbc-cpu`` preset), URIs as they are."""
    uris = []
    for d in cfg.eval.datasets:
        uris += list(cfg.data.train) if d == TRAINING_SETS else [resolve_dataset(d, suite_dir(cfg))]
    return list(dict.fromkeys(uris))


def runs_evaluation(cfg) -> bool:
    """Whether a run scores the external sets: at its end or while it trains."""
    return cfg.eval.at_end or cfg.eval.every_steps > 0


def suite_sets_needed(cfg, evaluates: bool | None = None) -> tuple[str, ...]:
    """The suite datasets a run needs: all of them for the default training data (no ``data.train``),
    else the external sets named by their suite names (``eval.datasets``, the default) when it
    evaluates (``evaluates``; default ``runs_evaluation``)."""
    if not cfg.data.train:
        return SUITE_NAMES
    evaluates = runs_evaluation(cfg) if evaluates is None else evaluates
    return tuple(n for n in cfg.eval.datasets if n in SUITE_NAMES) if evaluates else ()


def ensure_synthetic_suite(cfg, evaluates: bool | None = None) -> None:
    """Build the small synthetic suite's ``suite_sets_needed`` into ``data.synth_cache`` when missing."""
    cache = str(Path(cfg.data.synth_cache).expanduser())
    needed = suite_sets_needed(cfg, evaluates)
    if needed and not suite_ready(cache, needed):
        logger.info(f"building the small synthetic suite ({cfg.data.image_size} px) into {cache}")
        build_suite(cache, "small", cfg.data.image_size, seed=0, names=needed)
    cfg.data.synth_cache = cache


def ensure_eval_suite(train_suite: str, size: str, image_size: int) -> str:
    """The external sets at ``size`` next to the training suite (``<suite>-eval-<size>``); the small suite itself for 'small'."""
    if size == "small":
        return train_suite
    out = f"{train_suite}-eval-{size}"
    if not suite_ready(out, EXTERNAL_SETS):
        logger.info(f"building the external sets at the {size!r} size into {out}")
        build_suite(out, size, image_size, seed=0, names=EXTERNAL_SETS)
    return out
