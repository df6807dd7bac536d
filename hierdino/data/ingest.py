"""Ray Data ingest: Parquet shards -> decoded multi-crop uint8 batches for the training workers.

``read_parquet`` (streaming) -> ``randomize_block_order(seed + epoch)`` -> ``map_batches(multicrop)``
on CPU. Each output row holds ``global`` (uint8 ``[2, S, S, 3]``), ``local`` (uint8 ``[N, s, s, 3]``)
when N > 0, ``sup`` (uint8 ``[S, S, 3]``) when the supervised view is on, ``label`` (node index, -1
when unlabelled) and ``ok`` (False for an undecodable image, whose arrays are zeros).

Epochs are explicit: the training dataset is the union of one pipeline per epoch, each with its
own block order and crop seed, so a seed fixes every crop of every epoch, and a resumed run starts
from the epoch its checkpoint names. Several datasets mix with per-epoch row counts proportional to
``data.weights`` (whole copies plus a seeded random sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hierdino.data import shards, storage
from hierdino.data.augment import decode, random_resized_crop, row_rng, supervised_view
from hierdino.data.storage import StorageOptions
from hierdino.hierarchy import Hierarchy


class IngestError(ValueError):
    """Datasets that cannot feed a run: labels outside the hierarchy, too many corrupt images."""


@dataclass(frozen=True)
class CropSpec:
    image_size: int = 224
    global_scale: tuple = (0.32, 1.0)
    local_number: int = 8
    local_size: int = 96
    local_scale: tuple = (0.05, 0.32)
    supervised: bool = True
    seed: int = 0

    @classmethod
    def from_config(cls, cfg) -> "CropSpec":
        d = cfg.data
        sup = cfg.loss.supervised.kind != "none" and d.supervised_view == "separate"
        return cls(d.image_size, tuple(d.global_crops_scale), d.local_crops_number, d.local_crops_size,
                   tuple(d.local_crops_scale), sup, d.shuffle_seed + cfg.train.seed)


def multicrop(batch: dict, crops: CropSpec, label_index: dict, epoch: int, splits: tuple = ("train",)) -> dict:
    """The CPU half of augmentation for one batch of shard rows (``map_batches`` UDF)."""
    keep = [i for i, s in enumerate(batch["split"]) if s in splits]
    n = len(keep)
    S, s = crops.image_size, crops.local_size
    out = {
        "global": np.zeros((n, 2, S, S, 3), np.uint8),
        "label": np.full(n, -1, np.int64),
        "ok": np.zeros(n, bool),
    }
    if crops.local_number:
        out["local"] = np.zeros((n, crops.local_number, s, s, 3), np.uint8)
    if crops.supervised:
        out["sup"] = np.zeros((n, S, S, 3), np.uint8)
    for j, i in enumerate(keep):
        label = batch["label"][i]
        out["label"][j] = -1 if label is None else label_index[label]
        rng = row_rng(crops.seed, str(batch["image_id"][i]), epoch)
        try:
            im = decode(batch["image"][i])
        except Exception:  # corrupt bytes: counted by the consumer through ok=False
            continue
        for g in range(2):
            out["global"][j, g] = random_resized_crop(im, S, crops.global_scale, rng)
        for k in range(crops.local_number):
            out["local"][j, k] = random_resized_crop(im, s, crops.local_scale, rng)
        if crops.supervised and out["label"][j] >= 0:
            out["sup"][j] = supervised_view(im, S, rng)
        out["ok"][j] = True
    return out


def default_train_uris(cfg) -> list[str]:
    from hierdino.data.suite import TRAIN_SETS

    return [storage.join(cfg.data.synth_cache, n) for n in TRAIN_SETS]


def storage_options(cfg) -> StorageOptions:
    return StorageOptions(endpoint=cfg.data.s3_endpoint, region=cfg.data.s3_region)


def check_labels(manifests: dict[str, shards.Manifest], hierarchy: Hierarchy) -> None:
    """Every label name in the datasets must be a node of the run's hierarchy; all offenders listed."""
    missing = {uri: sorted(lab for lab in m.labels() if lab not in hierarchy) for uri, m in manifests.items()}
    missing = {u: labs for u, labs in missing.items() if labs}
    if missing:
        listed = "; ".join(f"{u}: {', '.join(labs)}" for u, labs in missing.items())
        raise IngestError(f"labels that are not nodes of hierarchy {hierarchy.name!r}: {listed}")


@dataclass
class TrainData:
    """What the trainer needs to know about its training data."""

    uris: list[str]
    manifests: dict
    rows_per_epoch: int
    labeled_per_epoch: int
    label_index: dict


def describe_train_data(uris: list[str], hierarchy: Hierarchy, weights: list[float] | None,
                        options: StorageOptions | None = None) -> TrainData:
    manifests = {u: shards.read_manifest(u, options) for u in uris}
    check_labels(manifests, hierarchy)
    sizes = [sum(m.counts.get("train", {}).values()) for m in manifests.values()]
    if any(n == 0 for n in sizes):
        empty = [u for u, n in zip(uris, sizes) if n == 0]
        raise IngestError(f"dataset(s) with no 'train' split rows: {empty}")
    mult = _multipliers(sizes, weights)
    rows = int(sum(n * k for n, k in zip(sizes, mult)))
    labeled = int(sum(m.num_labeled("train") * k for m, k in zip(manifests.values(), mult)))
    return TrainData(uris, manifests, rows, labeled, {n: hierarchy.index(n) for n in hierarchy.nodes})


def _multipliers(sizes: list[int], weights: list[float] | None) -> list[float]:
    """How many passes over each dataset make one epoch: 1 each, or proportional to ``weights``."""
    if weights is None:
        return [1.0] * len(sizes)
    total = sum(sizes)
    wsum = sum(weights)
    if wsum <= 0 or any(w < 0 for w in weights):
        raise IngestError(f"data.weights must be >= 0 and not all 0, got {weights}")
    return [w / wsum * total / n for w, n in zip(weights, sizes)]


def _read(uri: str, options: StorageOptions | None, num_cpus: float = 1.0):
    import ray.data

    fs, _ = storage.resolve(uri, options)
    # Read tasks take the same CPU share as the crop tasks: with a whole CPU each, a 2-CPU node
    # holding one training worker and a Tune trial driver could never schedule a read.
    ds = ray.data.read_parquet(shards.shard_paths(uri, options), filesystem=fs, num_cpus=num_cpus)
    return ds.select_columns(["image", "image_id", "label", "split"])


def _weighted(ds, mult: float, seed: int):
    copies = [ds] * int(math.floor(mult))
    frac = mult - math.floor(mult)
    if frac > 1e-6:
        copies.append(ds.random_sample(frac, seed=seed))
    return copies


def build_train_dataset(data: TrainData, crops: CropSpec, epochs: range, weights: list[float] | None = None,
                        options: StorageOptions | None = None, num_cpus: float = 1.0, batch_size: int = 32):
    """The lazily executed union of ``epochs`` passes over the training datasets."""
    if len(epochs) == 0:
        raise IngestError("no epochs to read")
    sizes = [sum(m.counts.get("train", {}).values()) for m in data.manifests.values()]
    mult = _multipliers(sizes, weights)
    per_epoch = []
    for e in epochs:
        parts = []
        for k, (uri, m) in enumerate(zip(data.uris, mult)):
            parts += _weighted(_read(uri, options, num_cpus), m, seed=crops.seed * 1009 + e * 31 + k)
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        ds = ds.randomize_block_order(seed=crops.seed * 7919 + e)
        ds = ds.map_batches(multicrop, batch_size=batch_size, batch_format="numpy", num_cpus=num_cpus,
                            fn_kwargs={"crops": crops, "label_index": data.label_index, "epoch": e})
        per_epoch.append(ds)
    return per_epoch[0].union(*per_epoch[1:]) if len(per_epoch) > 1 else per_epoch[0]


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
