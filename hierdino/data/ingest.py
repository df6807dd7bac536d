"""Ray Data ingest: Parquet shards -> decoded multi-crop uint8 batches for the training workers.

One streaming pipeline per training dataset: a plan of (epoch, file) items, files in a seeded order
per epoch -> one ``map_batches`` that reads each file row group by row group and crops on CPU ->
cut to the rows the run needs. Each worker
iterates its split of every stream through a local shuffle buffer (row-level shuffling) and
``hierdino.data.mix.MixedBatches`` cuts batches that hold every dataset in its proportion.

Why per-dataset streams and not one shuffled union: a union yields whole blocks of one dataset at a
time (one block per small dataset, as the first release found), and a global row shuffle
(``random_shuffle``, ``randomize_block_order``) is a barrier that materialises an epoch before the
first batch. Interleaving streams at row level in the worker gives exact proportions in every batch
with nothing materialised, the same on S3 as on local disk, and makes the data position a function
of the step (the schedule is deterministic), which is what resuming needs.

Each output row holds ``global`` (uint8 ``[2, S, S, 3]``), ``local`` (uint8 ``[N, s, s, 3]``)
when N > 0, ``sup`` (uint8 ``[S, S, 3]``) when the supervised view is on, ``label`` (node index, -1
when unlabelled) and ``ok`` (False for an undecodable image, whose arrays are zeros). With
``data.decode: device`` the crops are only planned here: rows carry ``jpeg``, ``boxes`` and
``flags`` instead, and the worker decodes and cuts them (``hierdino.data.device_decode``).

Epochs are explicit per dataset, each with its own file order and crop seed, so a seed fixes every
crop; a resumed run starts each dataset after the rows its steps consumed (``resume_position``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hierdino import storage
from hierdino.data import shards
from hierdino.data.crops import open_image, plan_views, render_views, row_rng
from hierdino.data.mix import MixSchedule, mix_proportions
from hierdino.errors import UserError
from hierdino.hierarchy import Hierarchy
from hierdino.storage import StorageOptions


class IngestError(UserError, ValueError):
    """Datasets that cannot feed a run: labels outside the hierarchy, too many corrupt images."""

    kind = "data"


@dataclass(frozen=True)
class CropSpec:
    image_size: int = 224
    global_scale: tuple = (0.32, 1.0)
    local_number: int = 8
    local_size: int = 96
    local_scale: tuple = (0.05, 0.32)
    supervised: bool = True
    seed: int = 0
    jpeg_draft: bool = True
    decode: str = "cpu"
    center_crop: float = 1.0

    @classmethod
    def from_config(cls, cfg) -> "CropSpec":
        d = cfg.data
        sup = cfg.loss.supervised.kind != "none" and d.supervised_view == "separate"
        return cls(d.image_size, tuple(d.global_crops_scale), d.local_crops_number, d.local_crops_size,
                   tuple(d.local_crops_scale), sup, d.shuffle_seed + cfg.train.seed, d.jpeg_draft,
                   d.decode, d.center_crop)


def multicrop(batch: dict, crops: CropSpec, label_index: dict, epoch: int, splits: tuple = ("train",)) -> dict:
    """The CPU half of augmentation for one batch of shard rows (``map_batches`` UDF): rendered crops,
    or with ``crops.decode == "device"`` the planned views and the encoded bytes."""
    keep = [i for i, s in enumerate(batch["split"]) if s in splits]
    n = len(keep)
    S, s = crops.image_size, crops.local_size
    unknown = [i for i in keep if batch["label"][i] is not None and batch["label"][i] not in label_index]
    if unknown:  # the manifest's counts were checked against the hierarchy: this shard disagrees with them
        labels, first = sorted({str(batch["label"][i]) for i in unknown}), str(batch["image_id"][unknown[0]])
        raise IngestError(f"labels {labels} in the shard rows (first: image {first!r}) are not nodes of the run's "
                          "hierarchy and not in their dataset's manifest.json: the shards and the manifest disagree; "
                          "rewrite the dataset with jobs/make_shards.py")
    out = {"label": np.array([-1 if batch["label"][i] is None else label_index[batch["label"][i]] for i in keep], np.int64),
           "ok": np.zeros(n, bool)}
    if crops.decode == "device":
        views = 2 + crops.local_number + int(crops.supervised)
        out.update(jpeg=np.empty(n, object), boxes=np.zeros((n, views, 4), np.float32), flags=np.zeros((n, views, 3), bool))
    else:
        out["global"] = np.zeros((n, 2, S, S, 3), np.uint8)
        if crops.local_number:
            out["local"] = np.zeros((n, crops.local_number, s, s, 3), np.uint8)
        if crops.supervised:
            out["sup"] = np.zeros((n, S, S, 3), np.uint8)
    for j, i in enumerate(keep):
        rng = row_rng(crops.seed, str(batch["image_id"][i]), epoch)
        plan = dict(global_size=S, global_scale=crops.global_scale, local_number=crops.local_number, local_size=s,
                    local_scale=crops.local_scale, supervised=crops.supervised and out["label"][j] >= 0,
                    center=crops.center_crop)
        try:
            if crops.decode == "device":
                _plan_row(out, j, batch["image"][i], rng, plan)
            else:
                _crop_row(out, j, batch["image"][i], rng, crops.jpeg_draft, plan)
        except Exception:  # corrupt bytes: counted by the consumer through ok=False
            continue
        out["ok"][j] = True
    return out


def _crop_row(out: dict, j: int, data: bytes, rng, draft: bool, plan: dict) -> None:
    views = render_views(data, rng, draft, **plan)
    out["global"][j] = views[:2]
    if plan["local_number"]:
        out["local"][j] = views[2:2 + plan["local_number"]]
    if plan["supervised"]:
        out["sup"][j] = views[-1]


def _plan_row(out: dict, j: int, data: bytes, rng, plan: dict) -> None:
    """Header only: the views as boxes and flags for ``device_decode``. An unlabelled row's
    supervised slot stays a zero box (never cut)."""
    views = plan_views(*open_image(data).size, rng, **plan)
    out["boxes"][j, :len(views)] = [v.box for v in views]
    out["flags"][j, :len(views)] = [(v.hflip, v.vflip, v.rot90) for v in views]
    out["jpeg"][j] = data


def check_labels(manifests: dict[str, shards.Manifest], hierarchy: Hierarchy) -> None:
    """Every label name in the datasets must be a node of the run's hierarchy; all offenders listed."""
    missing = {uri: sorted(lab for lab in m.labels() if lab not in hierarchy) for uri, m in manifests.items()}
    missing = {u: labs for u, labs in missing.items() if labs}
    if missing:
        listed = "; ".join(f"{u}: {', '.join(labs)}" for u, labs in missing.items())
        raise IngestError(f"labels that are not nodes of hierarchy {hierarchy.name!r}: {listed}")


@dataclass
class TrainData:
    """What the trainer needs to know about its training data: one entry per dataset, in ``uris`` order."""

    uris: list[str]
    manifests: dict
    sizes: list[int]            # train-split rows per dataset
    labeled: list[int]          # labelled train-split rows per dataset
    proportions: list[float]    # share of each dataset in every batch
    label_index: dict

    @property
    def labeled_fraction(self) -> float:
        """Expected fraction of labelled rows in a batch."""
        return sum(p * lab / n for p, lab, n in zip(self.proportions, self.labeled, self.sizes))

    def summary(self) -> str:
        return "; ".join(f"{u.rstrip('/').rsplit('/', 1)[-1]}: {n} images ({lab} labelled), {100 * p:.1f}% of each batch"
                         for u, n, lab, p in zip(self.uris, self.sizes, self.labeled, self.proportions))


# What the ingest reads, and the types it takes for each (Arrow's 64-bit-offset variants too).
INGEST_COLUMNS = {c: shards.SCHEMA.field(c).type for c in ("image", "image_id", "label", "split")}
_LARGE = {pa.string(): pa.large_string(), pa.binary(): pa.large_binary()}


def check_shards(uri: str, manifest: shards.Manifest, options: StorageOptions | None = None) -> None:
    """The shards a manifest lists exist, hold the columns the ingest reads (with their types) and
    together its ``num_images`` rows: Parquet footers only, before any cluster work."""
    fs, root = storage.resolve(uri, options)
    rows = 0
    for name in manifest.shards:
        path = f"{root}/{name}"
        try:
            meta = pq.read_metadata(path, filesystem=fs)
        except (OSError, pa.ArrowInvalid) as e:
            raise IngestError(f"{uri}: shard {name} listed in manifest.json cannot be read: {' '.join(str(e).split())[:300]}") from None
        schema = meta.schema.to_arrow_schema()
        bad = [f"{c} (missing)" if c not in schema.names else f"{c} ({schema.field(c).type}, expected {t})"
               for c, t in INGEST_COLUMNS.items()
               if c not in schema.names or schema.field(c).type not in (t, _LARGE[t])]
        if bad:
            raise IngestError(f"{uri}: shard {name} has bad column(s): {', '.join(bad)}; the shard format is "
                              "hierdino.data.shards.SCHEMA (write datasets with jobs/make_shards.py)")
        rows += meta.num_rows
    if rows != manifest.num_images:
        raise IngestError(f"{uri}: its shards hold {rows} rows but manifest.json says num_images={manifest.num_images}: "
                          "the shards and the manifest disagree; rewrite the dataset with jobs/make_shards.py")


def describe_train_data(uris: list[str], hierarchy: Hierarchy, weights: list[float] | None,
                        options: StorageOptions | None = None) -> TrainData:
    manifests = {u: shards.read_manifest(u, options) for u in uris}
    for u, m in manifests.items():
        check_shards(u, m, options)
    check_labels(manifests, hierarchy)
    sizes = [sum(m.counts.get("train", {}).values()) for m in manifests.values()]
    if any(n == 0 for n in sizes):
        empty = [u for u, n in zip(uris, sizes) if n == 0]
        raise IngestError(f"dataset(s) with no 'train' split rows: {empty}")
    try:
        proportions = mix_proportions(sizes, weights)
    except ValueError as e:
        raise IngestError(str(e)) from None
    labeled = [m.num_labeled("train") for m in manifests.values()]
    return TrainData(list(uris), manifests, sizes, labeled, proportions, {n: hierarchy.index(n) for n in hierarchy.nodes})


def epoch_file_order(n_files: int, seed: int, dataset: int, epoch: int) -> list[int]:
    """The seeded order in which an epoch reads a dataset's files."""
    return [int(i) for i in np.random.default_rng([seed & 0xFFFFFFFF, dataset, epoch]).permutation(n_files)]


def resume_position(consumed: int, size: int, n_files: int) -> tuple[int, int]:
    """``(epoch, first file index in that epoch's order)`` after ``consumed`` rows of a dataset.

    Files written by ``make_shards`` are of about equal size, so the rows already read of the current
    epoch map to a share of its files; rounding up skips at most one partly read file and never
    repeats a row of the interrupted epoch.
    """
    epoch, into = divmod(consumed, size)
    skip = math.ceil(into / size * n_files)
    return (epoch + 1, 0) if skip >= n_files else (epoch, skip)


def read_and_crop(plan: dict, uri: str, crops: CropSpec, label_index: dict, options: StorageOptions | None = None,
                  batch_size: int = 32):
    """``map_batches`` generator UDF: for each planned ``(epoch, path, first_group, end_group)`` read
    those row groups of the file (``end_group`` -1: to the last) and yield their train rows cropped
    with that epoch's seed (batches of ``batch_size``)."""
    columns = ["image", "image_id", "label", "split"]
    fs, _ = storage.resolve(uri, options)
    for epoch, path, first, end in zip(plan["epoch"], plan["path"], plan["first_group"], plan["end_group"]):
        with fs.open_input_file(str(path)) as f:
            pf = pq.ParquetFile(f)
            for g in range(int(first), pf.num_row_groups if end < 0 else int(end)):
                table = pf.read_row_group(g, columns=columns)
                for start in range(0, table.num_rows, batch_size):
                    rows = table.slice(start, batch_size).to_pydict()
                    out = multicrop(rows, crops, label_index, int(epoch))
                    if len(out["label"]):
                        yield out


def dataset_stream(uri: str, k: int, data: TrainData, crops: CropSpec, rows: int, consumed: int = 0,
                   options: StorageOptions | None = None, num_cpus: float = 1.0, batch_size: int = 32):
    """``rows`` decoded multi-crop rows of dataset ``k``, starting after ``consumed`` of its rows.

    A plan of ``(epoch, file)`` items, each epoch's files in a seeded order, feeds one ordered
    ``map_batches`` (a task per item) that crops each file row group by row group with the epoch's
    seed; the stream is cut at ``rows``. The first item is split in two, its first row group and
    the rest of its file: a task's rows reach the worker when it ends (one block), so the first batch
    waits for one row group to be cropped, not a whole file (at 224 px with 8 local crops, ~2 s for
    256 rows against ~15 s for a 2,000-image file on one core). Later tasks stay whole files: a task
    per row group cost the 64 px embedded default 15% of its throughput in task overhead.
    Streaming throughout: tasks start as the consumer needs rows
    (Ray Data's backpressure bounds memory), nothing waits for an epoch, and the first rows come from
    the first file without the later epochs competing for the CPUs (one operator, not a union of one
    pipeline per epoch). Row-level shuffling across files happens in the worker's local buffer.
    """
    import ray.data  # heavy: only the driver builds datasets; the crop workers load this module too

    paths = shards.shard_paths(uri, options)
    groups = data.manifests[uri].row_groups or [0] * len(paths)  # 0: not listed (older manifests)
    size = data.sizes[k]
    epoch, skip = resume_position(consumed, size, len(paths))
    plan, have = [], 0.0
    while have < rows + size:  # one epoch of margin: files are only about equal in size
        order = epoch_file_order(len(paths), crops.seed, k, epoch)[skip:]
        plan += [{"epoch": epoch, "path": paths[i], "first_group": 0, "end_group": -1} for i in order]
        have += size * len(order) / len(paths)
        epoch, skip = epoch + 1, 0
    if groups[paths.index(plan[0]["path"])] != 1:  # the first task: one row group, the rest of its file next
        plan[:1] = [dict(plan[0], end_group=1), dict(plan[0], first_group=1)]
    ds = ray.data.from_items(plan, override_num_blocks=len(plan))
    # Crop tasks take a fractional CPU share: with a whole CPU each, a 2-CPU node holding one
    # training worker and a Tune trial driver could never schedule one.
    ds = ds.map_batches(read_and_crop, batch_size=1, num_cpus=num_cpus,
                        fn_kwargs={"uri": uri, "crops": crops, "label_index": data.label_index, "options": options,
                                   "batch_size": batch_size})
    return ds.limit(rows)


def build_train_datasets(data: TrainData, crops: CropSpec, per_worker_batch: int, workers: int, start_step: int,
                         steps: int, options: StorageOptions | None = None, num_cpus: float = 1.0,
                         map_batch_size: int = 32) -> dict[str, object]:
    """One stream per dataset, named ``train_<k>``, holding the rows steps ``start_step .. steps - 1`` take.

    Every worker cuts its batches with ``MixSchedule(data.proportions, per_worker_batch)``, so a
    dataset gives ``workers`` times its per-worker count each step; its stream starts after the rows
    the steps before ``start_step`` took and holds one batch of slack per worker (Ray Train splits a
    stream between workers dynamically, not always evenly).
    """
    schedule = MixSchedule(data.proportions, per_worker_batch)
    before, after = schedule.consumed(start_step) * workers, schedule.consumed(steps) * workers
    out = {}
    for k, uri in enumerate(data.uris):
        need = int(after[k] - before[k])
        if need == 0:
            continue
        out[stream_name(k)] = dataset_stream(uri, k, data, crops, need + per_worker_batch * workers, int(before[k]),
                                             options, num_cpus, map_batch_size)
    return out


def stream_name(k: int) -> str:
    return f"train_{k}"


class CorruptCounter:
    """Counts undecodable images and fails once their fraction passes ``max_fraction``."""

    def __init__(self, max_fraction: float, min_seen: int = 200):
        self.max_fraction, self.min_seen = max_fraction, min_seen
        self.seen = 0
        self.corrupt = 0

    def update(self, ok) -> None:
        ok = np.asarray(ok)
        self.seen += int(ok.size)
        self.corrupt += int((~ok.astype(bool)).sum())
        if self.seen >= self.min_seen and self.corrupt > self.max_fraction * self.seen:
            raise IngestError(
                f"{self.corrupt} of {self.seen} images could not be decoded "
                f"({self.corrupt / self.seen:.1%} > data.max_corrupt_fraction={self.max_fraction:.1%})"
            )
