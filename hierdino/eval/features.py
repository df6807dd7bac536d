"""Frozen features of shard-format datasets: teacher CLS (optionally + mean patch token).

Models are named by a spec string:

- a run directory (``<run>/export/model.json`` + ``teacher_backbone.safetensors``), local or s3://;
- an exported ``.safetensors`` file (with ``model.json`` beside it);
- ``<timm name>[@<img_size>]=<weights path or s3:// URI>`` (DINOv2 / DinoBloom / timm weights, e.g.
  DinoBloom-S; input size 224 unless given);
- ``random:<arch>[@<img_size>]``: a randomly initialised backbone (context baseline);
- ``pixels``: raw pixels resized to 16 x 16 (context baseline).

Extraction runs as Ray Data batch inference (an actor pool that loads the model once per actor,
GPU when the cluster has one); results are cached under ``cache_dir`` keyed by model + dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from hierdino import logs, storage
from hierdino.data import shards
from hierdino.data.augment import to_model_input
from hierdino.eval.decode import decode_batch, raise_undecodable

logger = logging.getLogger(__name__)

PIXEL_SIZE = 16
_LOADED: set[str] = set()  # keys of the models whose weights loaded in this process


@dataclass(frozen=True)
class ModelSpec:
    spec: str
    name: str
    kind: str              # backbone | pixels
    arch: str | None = None
    img_size: int | None = None
    weights: str | None = None
    key: str = ""
    options: storage.StorageOptions | None = None  # where weights on S3 are read (endpoint, region)
    center_crop: float | None = None  # the share of each side the run trained on (model.json), None: unknown


def eval_center_crop(cfg) -> float:
    """The centred share of each side evaluated: ``eval.center_crop``, else the run's ``data.center_crop``."""
    return cfg.eval.center_crop if cfg.eval.center_crop is not None else cfg.data.center_crop


def _sha(data: bytes | str) -> str:
    return hashlib.sha1(data if isinstance(data, bytes) else data.encode()).hexdigest()[:16]


def _arch_at_size(text: str, default: int, spec: str) -> tuple[str, int]:
    """``<arch>[@<input size>]`` -> (arch, size)."""
    arch, _, size = text.partition("@")
    if size and not (size.isdigit() and int(size) > 0):
        raise ValueError(f"model {spec!r}: the input size after '@' must be a positive integer, got {size!r}")
    return arch, int(size) if size else default


def resolve_model(spec: str, default_img_size: int = 224, options: storage.StorageOptions | None = None) -> ModelSpec:
    """Parse a model spec (see module docstring) without building the model. Its cache key covers
    the weights' bytes, the arch and the input size."""
    if spec == "pixels":
        return ModelSpec(spec, "pixels", "pixels", key="pixels")
    if spec.startswith("random:"):
        arch, img = _arch_at_size(spec[len("random:"):], default_img_size, spec)
        return ModelSpec(spec, f"random-{arch}", "backbone", arch, img, None, _sha(f"random:{arch}:{img}"))
    if "=" in spec and not spec.startswith(("s3://", "/", ".")) and not os.path.exists(spec):  # runs/lr=0.1 is a path
        arch, weights = spec.split("=", 1)
        arch, img = _arch_at_size(arch, default_img_size, spec)
        key = _sha(f"{arch}:{img}:{_sha(storage.read_bytes(weights, options))}")
        return ModelSpec(spec, arch, "backbone", arch, img, weights, key, options)
    uri = spec.rstrip("/")
    if uri.endswith(".safetensors"):
        weights, info_uri = uri, storage.join(uri.rsplit("/", 1)[0], "model.json")
    else:
        weights, info_uri = storage.join(uri, "export", "teacher_backbone.safetensors"), storage.join(uri, "export", "model.json")
    if not storage.exists(info_uri, options):
        raise FileNotFoundError(f"model {spec!r}: no {info_uri}; give a run directory with an export, an exported "
                                ".safetensors, '<timm arch>=<weights>', 'random:<arch>' or 'pixels'")
    info = json.loads(storage.read_bytes(info_uri, options))
    parts = uri.split("/")
    if not uri.endswith(".safetensors"):
        name = parts[-1]
    else:
        name = parts[-3] if len(parts) >= 3 and parts[-2] == "export" else parts[-1].removesuffix(".safetensors")
    key = _sha(f"{info['arch']}:{info['img_size']}:{_sha(storage.read_bytes(weights, options))}")
    return ModelSpec(spec, name, "backbone", info["arch"], int(info["img_size"]), weights, key, options,
                     info.get("center_crop"))


def load_backbone(m: ModelSpec):
    """The spec's backbone in eval mode, with LayerScale when its weights have it (DINOv2 models and
    this project's runs; plain ViTs, timm's vit_*_224, have none)."""
    # timm: heavy, and neither pixel baselines nor cached features need it
    from hierdino.models.backbone import build_backbone, load_pretrained
    from hierdino.models.weights import parse, read_object

    torch.manual_seed(0)  # the random baseline is reproducible
    ckpt = parse(read_object(m.weights, m.options), m.weights) if m.weights is not None else None
    layerscale = ckpt is None or any(k.endswith((".ls1.gamma", ".ls2.gamma")) for k in ckpt.backbone)
    bb = build_backbone(m.arch, m.img_size, 0.0, 1e-5 if layerscale else None)
    if ckpt is not None:
        load_pretrained(bb, ckpt, strict=True)  # a partial load raises WeightsError naming the tensors
    return bb.eval()


@torch.no_grad()
def backbone_features(backbone, images: np.ndarray, img_size: int, batch_size: int = 128, device: str = "cpu",
                      patch_mean: bool = False) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` -> ``[N, D]`` (or ``[N, 2D]`` with the mean patch token) float32 features."""
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_input(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device))
        if x.shape[-1] != img_size:
            x = F.interpolate(x, size=(img_size, img_size), mode="bicubic", antialias=True, align_corners=False)
        cls, patches = backbone(x)
        feats = torch.cat([cls, patches.mean(1)], dim=1) if patch_mean else cls
        out.append(feats.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def pixel_features(images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    return F.interpolate(x, size=(PIXEL_SIZE, PIXEL_SIZE), mode="area").flatten(1).numpy()


class _Extractor:
    """Ray Data actor: loads the model once, then maps batches of shard rows to features."""

    def __init__(self, model: ModelSpec, patch_mean: bool, batch_size: int, center: float = 1.0):
        logs.in_worker()  # in a Ray Data actor: its lines (storage retries) on the console, as in the driver
        self.model, self.patch_mean, self.batch_size, self.center = model, patch_mean, batch_size, center
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.backbone = load_backbone(model).to(self.device) if model.kind == "backbone" else None

    def __call__(self, batch: dict) -> dict:
        """Features of a batch of rows; an image that does not decode is said in its row's
        ``decode_error`` (raised by ``dataset_features`` for the whole dataset: an error raised in a
        Ray Data task reaches the driver as text only). The other columns pass through; a batch
        already decoded by ``decode_batch`` (``pixels`` + ``decode_error``) is not decoded again."""
        size = self.model.img_size or 64
        if "pixels" not in batch:
            batch = decode_batch(batch, size, self.center)
        images, errors = batch["pixels"], batch["decode_error"]
        rest = {k: v for k, v in batch.items() if k not in ("pixels", "decode_error")}
        if self.backbone is None:
            feats = pixel_features(images)
        else:
            feats = backbone_features(self.backbone, images, size, self.batch_size, self.device, self.patch_mean)
        return rest | {"features": feats, "decode_error": errors}


def default_gpus(model) -> int:
    """GPUs per feature actor: one when the cluster has a GPU and the model is a backbone, else 0."""
    import ray  # heavy: only the Ray Data paths call this

    return 1 if ray.cluster_resources().get("GPU", 0) >= 1 and model.kind == "backbone" else 0


@dataclass
class DatasetFeatures:
    features: np.ndarray
    labels: np.ndarray     # node names (object array), None when unlabelled
    splits: np.ndarray
    image_ids: np.ndarray

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        sel = (self.splits == name) & np.array([lab is not None for lab in self.labels])
        return self.features[sel], self.labels[sel]


def _cache_bytes(feats: DatasetFeatures) -> bytes:
    """``feats`` as a feature cache (``.npz``) that loads without pickle: ids, labels and splits as
    fixed-width unicode arrays, and ``unlabeled`` marking the rows whose label is None."""
    unlabeled = np.array([lab is None for lab in feats.labels], dtype=bool)
    labels = np.array(["" if lab is None else str(lab) for lab in feats.labels], dtype=str)
    buf = io.BytesIO()
    np.savez(buf, features=feats.features, labels=labels, unlabeled=unlabeled,
             splits=np.asarray(feats.splits, dtype=str), image_ids=np.asarray(feats.image_ids, dtype=str))
    return buf.getvalue()


def _read_cache(cache: str) -> DatasetFeatures | None:
    """The features of the cache file ``cache``, or None (logged) when it cannot be used: damaged, or
    written by an older hierdino with object arrays, which would need pickle to load. Nothing in a
    cache is unpickled, so a cache on shared storage cannot run code here."""
    try:
        z = np.load(io.BytesIO(storage.read_bytes(cache)))
        labels = z["labels"].astype(object)
        labels[z["unlabeled"]] = None
        return DatasetFeatures(z["features"], labels, z["splits"].astype(object), z["image_ids"].astype(object))
    except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # damaged, or an old (pickled) format
        logger.info(f"feature cache {cache} is unreadable or in an old format ({type(e).__name__}: {e}): "
                    "computing the features again")
        return None


def _extract_with_ray_data(model: ModelSpec, dataset_uri: str, patch_mean: bool, batch_size: int, actors: int,
                           options, center: float = 1.0) -> list[dict]:
    """Feature batches from Ray Data batch inference: an actor pool (a GPU each when the cluster has one)."""
    import ray  # heavy: only features not already in the cache need Ray
    import ray.data  # likewise heavy, only without a cache hit

    fs, _ = storage.resolve(dataset_uri, options)
    ds = ray.data.read_parquet(shards.shard_paths(dataset_uri, options), filesystem=fs)
    gpus = default_gpus(model)
    ds = ds.map_batches(_Extractor, fn_constructor_kwargs={"model": model, "patch_mean": patch_mean, "batch_size": batch_size,
                                                                 "center": center},
                        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=gpus, num_cpus=0 if gpus else 1)
    return list(ds.iter_batches(batch_size=None, batch_format="numpy"))


def _extract_in_process(model: ModelSpec, dataset_uri: str, patch_mean: bool, batch_size: int, options,
                        center: float = 1.0) -> list[dict]:
    """Feature batches computed in this process, shard by shard (no Ray: no actor start-up per dataset)."""
    import pyarrow.parquet as pq  # only this path reads the shards itself

    fs, _ = storage.resolve(dataset_uri, options)
    extractor = _Extractor(model, patch_mean, batch_size, center)
    parts = []
    for path in shards.shard_paths(dataset_uri, options):
        with fs.open_input_file(path) as f:
            for rb in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=["image", "label", "split", "image_id"]):
                parts.append(extractor({c: rb.column(c).to_numpy(zero_copy_only=False) for c in rb.schema.names}))
    return parts


def features_in_process(where: str) -> bool:
    """``eval.features``: ``local`` computes features in the driver process, ``ray`` with a Ray Data
    actor pool, ``auto`` in the driver on a one-node cluster without GPUs (a laptop, CI: the pool's
    start-up, ~10 s per model and dataset, costs more than the features) and with Ray Data elsewhere."""
    if where != "auto":
        return where == "local"
    import ray  # heavy: the cluster is up whenever an evaluation runs

    return not ray.cluster_resources().get("GPU", 0) and sum(n["Alive"] for n in ray.nodes()) == 1


def dataset_features(model: ModelSpec, dataset_uri: str, cache_dir: str | None = None, patch_mean: bool = False,
                     batch_size: int = 128, actors: int = 1, options=None, in_process: bool = False,
                     center: float = 1.0) -> DatasetFeatures:
    """Features of every row of a dataset; read from / written to the cache when ``cache_dir`` is given.
    ``center``: the centred share of each side of an image the model sees (``crops.center_box``).

    ``in_process``: compute them here instead of with Ray Data, for many small evaluations on one
    machine, where starting an actor pool per model and dataset costs more than the features."""
    manifest = shards.read_manifest(dataset_uri, options)
    key = f"{model.key}-{_sha(manifest.to_json())}-{int(patch_mean)}" + (f"-c{center:g}" if center != 1.0 else "")
    cache = storage.join(cache_dir, f"{manifest.name}-{key}.npz") if cache_dir else None
    cached = _read_cache(cache) if cache and storage.exists(cache) else None
    if cached is not None:
        return cached
    if in_process:
        parts = _extract_in_process(model, dataset_uri, patch_mean, batch_size, options, center)
    else:
        if model.weights is not None and model.key not in _LOADED:  # an actor that cannot load them dies with a
            load_backbone(model)  # Ray error that keeps only their message: here they raise WeightsError
            _LOADED.add(model.key)
        parts = _extract_with_ray_data(model, dataset_uri, patch_mean, batch_size, actors, options, center)
    raise_undecodable([e for p in parts for e in p["decode_error"]], [i for p in parts for i in p["image_id"]],
                       f" of {dataset_uri}")
    out = DatasetFeatures(np.concatenate([p["features"] for p in parts]).astype(np.float32),
                          np.concatenate([p["label"] for p in parts]).astype(object),
                          np.concatenate([p["split"] for p in parts]).astype(object),
                          np.concatenate([p["image_id"] for p in parts]).astype(object))
    if cache:
        storage.write_bytes(cache, _cache_bytes(out))
    logger.info(f"  features: {model.name} x {manifest.name}: {out.features.shape}", extra=logs.PLAIN)
    return out
