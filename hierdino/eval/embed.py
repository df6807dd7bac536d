"""Embeddings (and hierarchical predictions) of large image collections, streamed through a Ray Data
actor pool into Parquet files (``jobs/embed.py``; the user's guide is ``docs/embed.md``).

The work is cut into parts: one per shard file of a shard-format dataset, one per ``files_per_part``
images of a plain folder (or S3 prefix; sorted paths, the relative path is the image id). Each part
becomes one output file ``part-<source>-<index>.parquet`` under ``out``, written whole (atomically)
by the driver once its last row is back, so a file that exists is complete: a rerun skips those.
``out/embed.json`` holds the settings a rerun must match (model, weights, preprocessing, dtype,
inputs, tau) and the calibration.

Pipeline: part descriptions -> read tasks (bytes, ids, labels; this module's top level imports no
torch, so their workers start light) -> an actor pool that loads the model once per actor and
decodes + embeds each batch (``_Embedder``: ``features._Extractor``; on GPU clusters the decode runs
in CPU tasks before the GPU actors) -> the driver, which applies the supervised head (a ``[D, L]``
matmul per batch), groups rows by part and writes each finished part.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hierdino import storage
from hierdino.data import shards
from hierdino.eval import predict
from hierdino.eval.decode import decode_batch

if TYPE_CHECKING:
    from hierdino.eval.features import ModelSpec

logger = logging.getLogger(__name__)

FORMAT = 1
SETTINGS_FILE = "embed.json"
DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
READ_THREADS = 16  # image files of a folder read at once by each read task


@dataclass(frozen=True)
class Part:
    name: str        # the output file
    source: str      # the --data entry it comes from
    uri: str         # the shard file, or the folder its files are under
    names: tuple     # files: paths relative to ``uri`` (the image ids); shards: ()
    rows: int


@dataclass(frozen=True)
class EmbedSettings:
    """What a rerun into the same ``out`` must repeat (``tau`` is checked once calibrated)."""
    model: str
    model_key: str
    arch: str | None
    img_size: int
    center_crop: float
    dtype: str
    patch_mean: bool
    predict: bool
    head_key: str | None
    files_per_part: int
    data: tuple
    images: int
    inputs: str      # a hash of the parts: which images go to which file
    tau: float | None = None


def image_files(src: str, options=None) -> list[str]:
    """Paths, relative to ``src``, of the image files under it (hidden ones and ``__MACOSX`` skipped), sorted."""
    names = storage.file_sizes(src, options)
    keep = [n for n in names if n.lower().endswith(shards.IMAGE_SUFFIXES)
            and not any(p.startswith(".") or p == "__MACOSX" for p in n.split("/"))]
    return sorted(keep)


def _parquet_rows(uri: str, options=None) -> int:
    fs, path = storage.resolve(uri, options)

    def rows():
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    return storage.with_retries(rows, uri, "read")


def list_parts(srcs: list[str], options=None, files_per_part: int = 1024) -> list[Part]:
    """The parts of every source: shard files of shard datasets, chunks of files of image folders."""
    parts = []
    for i, src in enumerate(srcs):
        src = src.rstrip("/")
        if storage.exists(storage.join(src, "manifest.json"), options):
            m = shards.read_manifest(src, options)
            for k, s in enumerate(m.shards):
                uri = storage.join(src, s)
                parts.append(Part(f"part-{i:03d}-{k:05d}.parquet", src, uri, (), _parquet_rows(uri, options)))
            continue
        names = image_files(src, options)
        if not names:
            raise FileNotFoundError(f"--data {src}: neither a shard dataset (no manifest.json) nor a folder of image "
                                    f"files ({', '.join(shards.IMAGE_SUFFIXES)}): nothing there")
        for k in range(0, len(names), files_per_part):
            chunk = tuple(names[k:k + files_per_part])
            parts.append(Part(f"part-{i:03d}-{k // files_per_part:05d}.parquet", src, src, chunk, len(chunk)))
    return parts


def parts_key(parts: list[Part]) -> str:
    text = json.dumps([[p.name, p.uri, p.rows, list(p.names)] for p in parts])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _read_files(uri: str, files: list[str], options=None) -> list[bytes]:
    """The bytes of ``files`` under ``uri``: one filesystem (one S3 client, its connections kept) and
    ``READ_THREADS`` requests in flight, since a request to S3 waits tens of milliseconds."""
    fs, root = storage.resolve(uri, options)

    def read(name: str) -> bytes:
        def get() -> bytes:
            with fs.open_input_stream(f"{root}/{name}") as f:
                return f.read()
        return storage.with_retries(get, storage.join(uri, name), "read")

    with ThreadPoolExecutor(min(READ_THREADS, len(files))) as pool:
        return list(pool.map(read, files))


def read_parts(batch: dict, options=None) -> dict:
    """Ray Data: part descriptions -> one row per image (bytes, id, source URI, label, split; ``""``
    where a label or split is unknown)."""
    cols: dict[str, list] = {k: [] for k in ("part", "row", "image", "image_id", "source_uri", "label", "split")}
    for name, uri, names in zip(batch["name"], batch["uri"], batch["names"]):
        if names:
            files = names.split("\n")
            images = _read_files(uri, files, options)
            ids, uris, labels = files, [storage.join(uri, f) for f in files], [""] * len(files)
            splits = labels
        else:
            fs, path = storage.resolve(uri, options)
            t = storage.with_retries(lambda: pq.read_table(path, filesystem=fs, columns=["image", "image_id", "label",
                                                                                          "split"]), uri, "read")
            images, ids = t["image"].to_pylist(), t["image_id"].to_pylist()
            labels, splits = [x or "" for x in t["label"].to_pylist()], [x or "" for x in t["split"].to_pylist()]
            uris = [uri] * len(ids)
        for k, v in zip(("image", "image_id", "source_uri", "label", "split"), (images, ids, uris, labels, splits)):
            cols[k] += list(v)
        cols["part"] += [name] * len(ids)
        cols["row"] += list(range(len(ids)))
    return {k: np.array(v, dtype=np.int64 if k == "row" else object) for k, v in cols.items()}


def check_writable(out: str, options=None) -> None:
    """Fail before any work when ``out`` cannot be written (missing bucket, bad credentials, read-only)."""
    storage.check_access(out, options)
    probe = storage.join(out, f".write-check-{time.time_ns()}")
    storage.write_bytes(probe, b"", options)
    storage.delete_file(probe, options)


def settings_problem(old: dict, new: dict, skip=()) -> str | None:
    """What differs between the settings stored in ``out`` and this run's, or None."""
    diffs = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
             if k not in skip and old.get(k) != new.get(k)]
    return "; ".join(diffs) or None


def stored_settings(out: str, options=None) -> dict | None:
    uri = storage.join(out, SETTINGS_FILE)
    if not storage.exists(uri, options):
        return None
    try:
        return json.loads(storage.read_bytes(uri, options))
    except ValueError as e:
        raise ValueError(f"{uri} is not valid JSON ({e}): delete it (and the part files beside it) to start again") from None


def refuse_changes(out: str, settings: EmbedSettings, options=None, skip=()) -> None:
    stored = stored_settings(out, options)
    problem = stored and settings_problem(stored.get("settings", {}), json.loads(json.dumps(asdict(settings))), skip)
    if problem:
        raise ValueError(f"{out} already holds output made with other settings ({problem}): give another --out, or "
                         "delete it to start again")


def _fixed_list(values: np.ndarray, valid: np.ndarray, typ: pa.DataType) -> pa.Array:
    """``[N, K]`` values as a fixed-size-list column, null where not ``valid``."""
    n, k = values.shape
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=typ)
    return pa.FixedSizeListArray.from_arrays(flat, k, mask=pa.array(~valid))


def _strings(values, valid=None) -> pa.Array:
    return pa.array([None if (valid is not None and not ok) or v in ("", None) else str(v)
                     for v, ok in zip(values, valid if valid is not None else [True] * len(values))], pa.string())


def part_table(rows: dict, dim: int, dtype: str, head=None, tau: float = 0.5, meta: dict | None = None) -> pa.Table:
    """A part's rows (the actor outputs, concatenated, in input order) as the output table."""
    feats, err = rows["features"], np.array([e or "" for e in rows["decode_error"]], dtype=object)
    ok = err == ""
    cols = {"image_id": _strings(rows["image_id"]), "source_uri": _strings(rows["source_uri"]),
            "label": _strings(rows["label"]), "split": _strings(rows["split"]),
            "embedding": _fixed_list(feats[:, :dim], ok, DTYPES[dtype])}
    if feats.shape[1] > dim:
        cols["patch_mean"] = _fixed_list(feats[:, dim:], ok, DTYPES[dtype])
    if head is not None:
        h = head.hierarchy
        leaf = predict.leaf_probabilities(feats[:, :dim], head.weight, head.bias)
        node = predict.node_probabilities(leaf, h)
        names, probs = predict.top_k(leaf, h, 3)
        call, depth, cprob = predict.hierarchical_call(node, h, tau)
        cols |= {"leaf_probs": _fixed_list(leaf.astype(np.float32), ok, pa.float32()),
                 "node_probs": _fixed_list(node.astype(np.float32), ok, pa.float32()),
                 "top3_leaves": _fixed_list(names.astype(object), ok, pa.string()),
                 "top3_probs": _fixed_list(probs.astype(np.float32), ok, pa.float32()),
                 "call": _strings(call, ok), "call_depth": pa.array(depth.astype(np.int8), mask=~ok),
                 "call_prob": pa.array(cprob.astype(np.float32), mask=~ok)}
    cols["error"] = _strings(err)
    table = pa.table(cols)
    return table.replace_schema_metadata({"hierdino.embed": json.dumps(meta or {})})


def _write_table(uri: str, table: pa.Table, options=None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(uri, buf.getvalue(), options)


class Progress:
    """One progress line at most every ``every_s`` seconds: images done, images/s, errors, files."""

    def __init__(self, total: int, files: int, every_s: float = 10.0):
        self.total, self.files, self.every_s = total, files, every_s
        self.start, self.start_wall = time.monotonic(), time.time()
        self.last = self.start
        self.done = self.written = 0
        # (actor, wall-clock time it embedded a batch) -> that batch's rows (``_Embedder``): rows reach
        # the driver a part at a time, behind the actors, so the pool's pace is read from these
        self.batches: collections.Counter = collections.Counter()
        self.errors: list[str] = []
        self.n_errors = 0

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-9)

    def embedded(self, by: np.ndarray, at: np.ndarray) -> None:
        """Note which actor embedded each row that came back, and when."""
        self.batches.update(zip(by.tolist(), at.tolist()))

    def pool(self) -> dict:
        """The pool's times (seconds from the start): its first batch embedded, the moment every actor
        had embedded one (``up``: its start-up over), its last batch; and its steady rate, the images
        embedded from ``up`` to the last batch over that time (0 when too few batches tell)."""
        if not self.batches:
            return {"first_batch_s": None, "pool_up_s": None, "last_batch_s": None, "steady_images": 0,
                    "steady_images_per_s": 0.0}
        firsts: dict[int, float] = {}
        for actor, t in self.batches:
            firsts[actor] = min(firsts.get(actor, t), t)
        up, last = max(firsts.values()), max(t for _, t in self.batches)
        n = sum(k for (_, t), k in self.batches.items() if t > up)
        return {"first_batch_s": round(min(firsts.values()) - self.start_wall, 2),
                "pool_up_s": round(up - self.start_wall, 2), "last_batch_s": round(last - self.start_wall, 2),
                "steady_images": n, "steady_images_per_s": round(n / (last - up), 2) if last > up else 0.0}

    def update(self, n: int, errors: list[str], written: int = 0) -> None:
        self.done += n
        self.written += written
        self.n_errors += len(errors)
        self.errors += errors[:5 - len(self.errors)] if len(self.errors) < 5 else []
        if time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            logger.info(self.line())

    def line(self) -> str:
        pct = 100 * self.done / max(self.total, 1)
        return (f"embed: {self.done:,}/{self.total:,} images ({pct:.0f}%), {self.rate():.1f} images/s, "
                f"{self.n_errors} undecodable, {self.written}/{self.files} files written")


def model_dims(model: ModelSpec, patch_mean: bool, with_head: bool, options=None):
    """(CLS width, supervised head or None); the weights load here once, so weights that do not fit
    raise ``WeightsError`` in this process, not as text from inside an actor."""
    from hierdino.eval.features import PIXEL_SIZE, load_backbone  # torch: not in the read tasks' workers
    from hierdino.models.head_export import read_head  # safetensors: only predictions read heads

    if model.kind == "pixels":
        if patch_mean or with_head:
            raise ValueError("the 'pixels' model has no patch tokens and no supervised head: drop --patch-mean/--predict")
        return 3 * PIXEL_SIZE ** 2, None
    dim = load_backbone(model).embed_dim
    if with_head and model.weights is None:
        raise ValueError(f"--predict: model {model.spec!r} has no supervised head (give a run directory or export "
                         "whose run trained one)")
    return dim, read_head(model.weights, dim, model.options or options) if with_head else None


def calibrate_head(model: ModelSpec, head, uri: str, split: str, target: float, center: float, dim: int,
                   options=None) -> dict:
    """tau for ``target`` precision on the labelled ``split`` of the shard dataset ``uri``."""
    from hierdino.eval.features import dataset_features, features_in_process  # Ray: only to calibrate

    feats = dataset_features(model, uri, None, options=options, in_process=features_in_process("auto"), center=center)
    x, y = feats.split(split)
    if not len(y):
        raise ValueError(f"--calibrate {uri}: no labelled '{split}' rows (its splits: {sorted(set(feats.splits))})")
    leaf = predict.leaf_probabilities(x[:, :dim], head.weight, head.bias)
    return dict(predict.calibrate(leaf, list(y), head.hierarchy, target), uri=uri, split=split)


class _Embedder:
    """Ray Data actor: ``features._Extractor`` (the model loaded once, then decode + embed per batch),
    and which actor embedded each batch when (``embedded_by``, ``embedded_at``: the driver tells the
    pool's pace from its start-up with them; they are not written)."""

    def __init__(self, **kwargs):
        from hierdino.eval.features import _Extractor  # torch: in the actors, not in the read tasks' workers

        self.extract = _Extractor(**kwargs)
        self.id = int.from_bytes(os.urandom(6), "little")

    def __call__(self, batch: dict) -> dict:
        out = self.extract(batch)
        n = len(out["decode_error"])
        return out | {"embedded_by": np.full(n, self.id, np.int64), "embedded_at": np.full(n, time.time())}


def _pipeline(todo: list[Part], model: ModelSpec, patch_mean: bool, center: float, batch_size: int,
              actors: int | None, gpus: float | None, options=None):
    """The Ray Data dataset of embedded rows of ``todo``, and the pool it runs on (actors, GPUs each)."""
    import ray  # heavy: only a job that embeds images starts Ray
    import ray.data  # likewise

    from hierdino.eval.features import default_gpus  # torch: not in the read tasks' workers

    if gpus is None:
        gpus = default_gpus(model)
    if actors is None:
        res = ray.cluster_resources()
        actors = max(1, int(res.get("GPU", 0) // gpus) if gpus else int(res.get("CPU", 2)) - 1)
    items = [{"name": p.name, "uri": p.uri, "names": "\n".join(p.names)} for p in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # reads are I/O: no CPU reserved, so an actor pool as large as the cluster still gets its images; one
    # read task in flight per actor (each reads READ_THREADS files at once) is ahead of the actors, and
    # each more is a worker process to start
    ds = ds.map_batches(read_parts, batch_size=1, batch_format="numpy", fn_kwargs={"options": options}, num_cpus=0,
                        compute=ray.data.TaskPoolStrategy(size=min(len(items), actors)))
    if gpus:  # the decode on CPU tasks, the GPU actors only run the model
        ds = ds.map_batches(decode_batch, fn_kwargs={"size": model.img_size or 64, "center": center},
                            batch_size=batch_size, batch_format="numpy")
    ds = ds.map_batches(_Embedder, fn_constructor_kwargs={"model": model, "patch_mean": patch_mean,
                                                           "batch_size": batch_size, "center": center},
                        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=gpus, num_cpus=0 if gpus else 1)
    return ds, actors, gpus


def _concat(chunks: list[dict]) -> dict:
    rows = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    order = np.argsort(rows["row"], kind="stable")
    return {k: v[order] for k, v in rows.items()}


def _undecodable(batch: dict) -> list[str]:
    """'<source URI>[#<image id>] (<why>)' of each row whose image did not decode."""
    return [f"{u if u.endswith(i) else f'{u}#{i}'} ({e})"
            for u, i, e in zip(batch["source_uri"], batch["image_id"], batch["decode_error"]) if e]


def stream(ds, todo: list[Part], out: str, write, progress: Progress) -> None:
    """Rows of ``ds`` grouped by part; ``write(part name, rows)`` once a part's last row is back."""
    expected = {p.name: p.rows for p in todo}
    pending: dict[str, list[dict]] = {}
    seen = dict.fromkeys(expected, 0)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        written = 0
        for name in np.unique(batch["part"]):
            sel = batch["part"] == name
            pending.setdefault(name, []).append({k: v[sel] for k, v in batch.items()})
            seen[name] += int(sel.sum())
            if seen[name] == expected[name]:
                write(name, _concat(pending.pop(name)))
                written += 1
        progress.embedded(batch["embedded_by"], batch["embedded_at"])
        progress.update(len(batch["part"]), _undecodable(batch), written)
    if pending:
        raise RuntimeError(f"embed: parts {sorted(pending)[:5]} under {out} came back incomplete "
                           f"({', '.join(f'{seen[n]}/{expected[n]} rows' for n in sorted(pending)[:5])})")


@dataclass(frozen=True)
class EmbedOptions:
    """The job's settings beside the model, the sources and ``out`` (``jobs/embed.py`` flags)."""
    dtype: str = "float16"
    patch_mean: bool = False
    predict: bool = False
    calibrate: str | None = None      # a labelled shard dataset
    calibrate_split: str = "val"
    target_precision: float = 0.95
    tau: float | None = None          # a fixed threshold instead of a calibration (default 0.5)
    center_crop: float = 1.0
    batch_size: int = 64
    actors: int | None = None         # default: one per GPU, else the cluster's CPUs less one
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    files_per_part: int = 1024


def _settings(model: ModelSpec, srcs: list[str], o: EmbedOptions, head, parts: list[Part]) -> EmbedSettings:
    from hierdino.eval.features import PIXEL_SIZE  # torch: not in the read tasks' workers

    return EmbedSettings(model.spec, model.key, model.arch, model.img_size or PIXEL_SIZE, o.center_crop, o.dtype,
                         o.patch_mean, o.predict, head.key if head else None, o.files_per_part,
                         tuple(s.rstrip("/") for s in srcs), sum(p.rows for p in parts), parts_key(parts))


def run_embed(model: ModelSpec, srcs: list[str], out: str, o: EmbedOptions = EmbedOptions(), options=None) -> dict:
    """Embed (and with ``o.predict`` classify) every image of ``srcs`` into Parquet files under ``out``;
    parts already written by an earlier run with the same settings are skipped. Returns the summary."""
    if o.dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {o.dtype!r}")
    check_writable(out, options)  # before any work: a missing bucket or bad credentials are said now
    dim, head = model_dims(model, o.patch_mean, o.predict, options)
    parts = list_parts(srcs, options, o.files_per_part)
    settings = _settings(model, srcs, o, head, parts)
    refuse_changes(out, settings, options, skip=("tau", "model"))
    calibration = None
    if head is not None and o.calibrate:
        calibration = calibrate_head(model, head, o.calibrate, o.calibrate_split, o.target_precision, o.center_crop,
                                     dim, options)
    tau = (calibration["tau"] if calibration else o.tau if o.tau is not None else 0.5) if head is not None else None
    settings = EmbedSettings(**{**asdict(settings), "tau": tau})
    refuse_changes(out, settings, options, skip=("model",))
    meta = {"format": FORMAT, "settings": asdict(settings), "dim": dim, "calibration": calibration,
            "leaves": list(head.hierarchy.leaves) if head else None,
            "nodes": predict.node_names(head.hierarchy) if head else None, "hierarchy": head.hierarchy.to_dict() if head else None}
    storage.write_bytes(storage.join(out, SETTINGS_FILE), json.dumps(meta, indent=2).encode(), options)
    done = set(storage.file_sizes(out, options)) & {p.name for p in parts}
    todo = [p for p in parts if p.name not in done]
    logger.info(f"embed: {settings.images:,} images in {len(parts)} files -> {out}"
                + (f" ({len(done)} already complete)" if done else ""))
    progress = Progress(sum(p.rows for p in todo), len(todo))
    part_meta = {k: meta[k] for k in ("format", "dim", "leaves", "nodes")} | {"model": model.spec, "tau": tau,
                                                                             "dtype": o.dtype}
    write = lambda name, rows: _write_table(storage.join(out, name), part_table(rows, dim, o.dtype, head, tau,  # noqa: E731
                                                                                 part_meta), options)
    actors, gpus = 0, 0
    if todo:
        ds, actors, gpus = _pipeline(todo, model, o.patch_mean, o.center_crop, o.batch_size, o.actors, o.gpus_per_actor,
                                     options)
        stream(ds, todo, out, write, progress)
    summary = {"out": out, "files": len(parts), "written": len(todo), "skipped_complete": len(done),
               "images": progress.done, "seconds": round(time.monotonic() - progress.start, 2),
               "images_per_s": round(progress.rate(), 2), **progress.pool(), "actors": actors, "gpus_per_actor": gpus,
               "undecodable": progress.n_errors, "first_undecodable": progress.errors, "tau": tau,
               "calibration": calibration}
    storage.write_bytes(storage.join(out, "summary.json"), json.dumps(summary, indent=2).encode(), options)
    return summary


def summary_text(s: dict) -> str:
    lines = [f"embed: wrote {s['written']} of {s['files']} files under {s['out']} ({s['skipped_complete']} complete "
             f"already): {s['images']:,} images in {s['seconds']:.1f} s, {s['images_per_s']:.1f} images/s "
             f"({s['actors']} actors" + (f", {s['gpus_per_actor']:g} GPU each)" if s["gpus_per_actor"] else ", CPU)")
             + (f"; the pool was up after {s['pool_up_s']:.1f} s (every actor's first batch embedded), then "
                f"{s['steady_images_per_s']:.1f} images/s" if s["steady_images_per_s"] else "")]
    if s["undecodable"]:
        lines.append(f"  {s['undecodable']} image(s) did not decode (rows with an 'error'), the first: "
                     + "; ".join(s["first_undecodable"]))
    if s["tau"] is not None:
        c = s["calibration"]
        lines.append(f"  hierarchical calls at tau {s['tau']:g}" + (
            f" (calibrated on {c['uri']} {c['split']}, {c['n']} images: precision {c['precision']:.3f} >= "
            f"{c['target_precision']:g}, coverage {c['coverage']:.3f}, at leaf depth {c['leaf_coverage']:.3f}; "
            f"flat argmax accuracy {c['flat_accuracy']:.3f})" if c else " (not calibrated)"))
    return "\n".join(lines)
