"""The shard format: Parquet files of encoded images plus a ``manifest.json`` per dataset.

Columns: ``image`` (PNG/JPEG bytes), ``image_id``, ``source`` (dataset name), ``raw_label``
(nullable), ``label`` (nullable node name), ``split`` (train/val/test). Labels are node *names*,
resolved to indices against the run's hierarchy at train time.

Writers here are pure pyarrow; ``jobs/make_shards.py`` is the CLI over them (image folders,
``path,label[,split]`` CSVs, the public layouts of ``data/layouts.py``, the synthetic suite). Datasets
without splits of their own get them from ``SplitSpec``: a hash of (seed, image id), per image.
"""

from __future__ import annotations

import collections
import csv
import functools
import hashlib
import io
import json
import logging
import os
import re
import secrets
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from hierdino import logs, storage
from hierdino.data.crops import HIGH_DEPTH_MODES, to_8bit
from hierdino.errors import UserError
from hierdino.labels import LabelMap
from hierdino.storage import StorageOptions

logger = logging.getLogger(__name__)
MAKE_SHARDS = logs.tag("make_shards")  # its lines read [make_shards] ..., as the job's own

SCHEMA_VERSION = 1
SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("image_id", pa.string()),
    ("source", pa.string()),
    ("raw_label", pa.string()),
    ("label", pa.string()),
    ("split", pa.string()),
])
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".tif", ".tiff", ".bmp", ".webp", ".gif")


class ShardError(UserError, ValueError):
    """Bad input to the shard writers (unreadable images, bad CSV rows, bad splits)."""

    kind = "data"


@dataclass
class Record:
    image: bytes
    image_id: str
    source: str
    raw_label: str | None
    label: str | None
    split: str = "train"


@dataclass
class Manifest:
    name: str
    source: str
    num_images: int
    counts: dict[str, dict[str, int]]  # split -> label (or "<unlabeled>") -> count
    label_map: dict = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    row_groups: list[int] = field(default_factory=list)  # per shard (written since 2026-11-27; empty: unknown)
    hierarchy: str | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)

    def labels(self) -> set[str]:
        return {lab for per in self.counts.values() for lab in per if lab != UNLABELED}

    def num_labeled(self, split: str | None = None) -> int:
        splits = [split] if split else list(self.counts)
        return sum(n for s in splits for lab, n in self.counts.get(s, {}).items() if lab != UNLABELED)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=False)


UNLABELED = "<unlabeled>"


def read_manifest(uri: str, options: StorageOptions | None = None) -> Manifest:
    """The manifest of the dataset at ``uri`` (a directory holding ``manifest.json``)."""
    where = storage.join(uri, "manifest.json")
    text = storage.read_bytes(where, options)
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ShardError(f"{where} is not valid JSON ({e}); rewrite the dataset with jobs/make_shards.py") from None
    if not isinstance(data, dict):
        raise ShardError(f"{where}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardError(f"{where} has schema_version {version!r}; this hierdino reads {SCHEMA_VERSION}")
    known = set(Manifest.__dataclass_fields__)
    required = {n for n, f in Manifest.__dataclass_fields__.items()
                if f.default is MISSING and f.default_factory is MISSING}
    missing, unknown = sorted(required - set(data)), sorted(set(data) - known)
    if missing or unknown:
        raise ShardError(f"{where}: " + "; ".join(
            ([f"missing key(s) {missing}"] if missing else [])
            + ([f"unknown key(s) {unknown} (free-form entries belong under 'extra')"] if unknown else [])))
    problem = storage.name_problem(data["name"])  # the name becomes part of output paths (feature caches, plots)
    if problem:
        raise ShardError(f"{where}: dataset name {data['name']!r} {problem}")
    return Manifest(**data)


def shard_paths(uri: str, options: StorageOptions | None = None) -> list[str]:
    """Filesystem paths of the dataset's shards, as listed in its manifest."""
    m = read_manifest(uri, options)
    _, root = storage.resolve(uri, options)
    return [f"{root}/{s}" for s in m.shards]


class _ShardWriter:
    """Parquet shards of about ``target`` bytes under ``root`` (``uri``), named for this write
    (``shard-<write>-<i>.parquet``), one row group per ``write``."""

    def __init__(self, fs, root: str, uri: str, target: int, row_group_rows: int):
        self.fs, self.root, self.uri, self.target, self.row_group_rows = fs, root, uri, target, row_group_rows
        self.write_id, self.shards, self.row_groups = secrets.token_hex(4), [], []
        self.writer, self.stream, self.bytes = None, None, 0

    def write(self, batch: list[Record]) -> None:
        if not batch:
            return
        table = pa.Table.from_pylist([r.__dict__ for r in batch], schema=SCHEMA)
        if self.writer is None:
            name = f"shard-{self.write_id}-{len(self.shards):05d}.parquet"
            self.shards.append(name)
            self.row_groups.append(0)
            self.stream = storage.with_retries(lambda: self.fs.open_output_stream(f"{self.root}/{name}"),
                                               storage.join(self.uri, name), "write")
            self.writer, self.bytes = pq.ParquetWriter(self.stream, SCHEMA, compression="none"), 0
        self.writer.write_table(table, row_group_size=self.row_group_rows)  # one row group: len(batch) <= its rows
        self.row_groups[-1] += 1
        self.bytes += table.nbytes
        if self.bytes >= self.target:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.stream.close()
            self.writer = None


def write_dataset(records: Iterable[Record], uri: str, name: str, source: str, label_map: dict | None = None,
                  hierarchy: str | None = None, target_file_mb: float = 128.0, row_group_rows: int = 256,
                  options: StorageOptions | None = None, extra: dict | None = None) -> Manifest:
    """Write records as Parquet shards of about ``target_file_mb`` plus ``manifest.json``.

    The manifest is written last, so a dataset without one is incomplete and readers refuse it. Over
    an existing dataset, the new shards get names of their own (``shard-<write>-<i>.parquet``) and
    the manifest is replaced last: a write that fails (a bad image, a cut connection) leaves the
    earlier dataset whole and its own shards deleted; one that succeeds deletes the earlier shards.
    """
    problem = storage.name_problem(name)  # refused here, not only when a run reads the manifest
    if problem:
        raise ShardError(f"dataset name {name!r} (from --name or the last part of --out) {problem}; pass --name")
    fs, root = storage.resolve(uri, options)
    if isinstance(fs, storage.pafs.LocalFileSystem):
        os.makedirs(root, exist_ok=True)
    out = _ShardWriter(fs, root, uri, int(target_file_mb * 2 ** 20), row_group_rows)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    batch: list[Record] = []
    n = 0
    try:
        for r in records:
            if r.split not in SPLITS:
                raise ShardError(f"image {r.image_id!r}: split {r.split!r} is not one of {SPLITS}")
            counts[r.split][r.label if r.label is not None else UNLABELED] += 1
            batch.append(r)
            n += 1
            if len(batch) >= row_group_rows:
                out.write(batch)
                batch = []
        out.write(batch)
        out.close()
        if n == 0:
            raise ShardError(f"no images to write for dataset {name!r}")
    except BaseException:
        for cleanup in [out.close] + [functools.partial(storage.delete_file, storage.join(uri, s), options)
                                      for s in out.shards]:  # this write's own files: an earlier dataset stays
            try:
                cleanup()
            except Exception:  # best effort: the error that stopped the write is the one to report
                pass
        raise
    manifest = Manifest(name=name, source=source, num_images=n,
                        counts={s: dict(sorted(c.items())) for s, c in counts.items()},
                        label_map=label_map or {}, shards=out.shards, row_groups=out.row_groups, hierarchy=hierarchy,
                        extra=extra or {})
    storage.write_bytes(storage.join(uri, "manifest.json"), manifest.to_json().encode(), options)
    for old in storage.list_files(uri, ".parquet", options):  # an earlier write's shards, now unlisted
        folder, base = old.rsplit("/", 1)
        if folder == root.rstrip("/") and base.startswith("shard-") and base not in out.shards:
            storage.delete_file(storage.join(uri, base), options)
    return manifest


def read_table(uri: str, columns: list[str] | None = None, split: str | None = None,
               options: StorageOptions | None = None) -> pa.Table:
    """The whole dataset (or one split) as an Arrow table; for evaluation-sized sets."""
    fs, _ = storage.resolve(uri, options)
    tables = [pq.read_table(p, columns=columns, filesystem=fs) for p in shard_paths(uri, options)]
    table = pa.concat_tables(tables)
    if split is not None:
        import pyarrow.compute as pc  # 50-100 ms to import: not for --help or the ingest workers

        if columns is not None and "split" not in columns:
            raise ShardError("read_table: include 'split' in columns to filter by split")
        table = table.filter(pc.equal(table["split"], split))
    return table


# -- adapters: image folders and CSVs ------------------------------------------------------------

class Item(NamedTuple):
    """One image to write. ``image`` is its file, or its pixels for datasets stored as arrays;
    ``split`` is ``None`` while the dataset gives none (``finish_splits`` then chooses one);
    ``image_id`` is the path relative to the dataset's root (the same wherever the root sits)."""

    image: Path | np.ndarray
    raw_label: str | None
    label: str | None
    split: str | None
    image_id: str


def _check_image(path: Path) -> bytes:
    """Bytes of an image that PIL can decode: PNG/JPEG kept as they are, other formats (TIFF, BMP,
    WebP, GIF) and 16-bit images re-encoded as 8-bit PNG (``crops.to_8bit``)."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.format in ("PNG", "JPEG") and im.mode not in HIGH_DEPTH_MODES + ("F",):
            return data
        return _png(im)


def _png(im: Image.Image) -> bytes:
    """``im`` as 8-bit grey or RGB PNG bytes."""
    im8 = to_8bit(im)
    buf = io.BytesIO()
    (im8 if im8.mode in ("L", "RGB") else im8.convert("RGB")).save(buf, format="PNG")
    return buf.getvalue()


def _image_bytes(item: Item) -> bytes:
    """The encoded image of an item: its file's bytes, or its pixel array as PNG."""
    if isinstance(item.image, np.ndarray):
        return _png(Image.fromarray(item.image))
    return _check_image(item.image)


def _load_images(items: list[Item], source: str, skip_bad: bool, uri: str = "") -> Iterator[Record]:
    """Records of the readable images, streamed (one image in memory at a time).

    Unreadable images are collected; at the end they fail the dataset (after its shards, before its
    manifest, so the incomplete dataset is refused by readers) or, with ``skip_bad``, are listed.
    """
    bad: list[str] = []
    for item in items:
        try:
            data = _image_bytes(item)
        except Exception as e:  # PIL raises many types for broken files
            where = item.image if isinstance(item.image, Path) else item.image_id
            bad.append(f"{where} ({type(e).__name__}: {re.sub(r'<_io.BytesIO object at 0x[0-9a-f]+>', 'the file', str(e))})")
            continue
        yield Record(data, item.image_id, source, item.raw_label, item.label, item.split)
    if bad and not skip_bad:
        raise ShardError(f"{len(bad)} unreadable image(s), so nothing was written to {uri or 'the dataset'} (a dataset "
                         "already there is unchanged); fix them or pass --skip-bad to skip them:\n  " + "\n  ".join(bad))
    if bad:
        logger.warning(f"skipped {len(bad)} unreadable image(s):\n  " + "\n  ".join(bad), extra=MAKE_SHARDS)


SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _walk_files(top: Path) -> tuple[list[Path], list[Path]]:
    """Files under ``top`` (symlinked folders followed; a link back to a folder's own ancestor, a
    cycle, is not), and the skipped hidden ones (``.DS_Store``, macOS ``._*`` and ``__MACOSX``)."""
    files, hidden = [], []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        here = Path(dirpath)
        above = [here.parents[i] for i in range(len(here.relative_to(top).parts))]  # up to top
        if os.path.realpath(here) in {os.path.realpath(a) for a in above}:
            dirnames[:] = []
            continue
        keep = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        hidden += [Path(dirpath, d) for d in dirnames if d not in keep]
        dirnames[:] = sorted(keep)
        for f in sorted(filenames):
            (hidden if f.startswith(".") else files).append(Path(dirpath, f))
    return files, hidden


def visible_folders(root: Path) -> list[str]:
    """Names of the folders right under ``root``, sorted, without hidden ones and ``__MACOSX``."""
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX")


def check_folder(root: Path) -> None:
    """Fail unless ``root`` is a local folder."""
    if not root.is_dir():
        raise ShardError(f"image folder {root} does not exist" if not str(root).startswith("s3:")
                         else f"image folder {root}: make_shards reads image folders from local disk, not S3; "
                              "copy them locally first (e.g. aws s3 sync)")


def _class_roots(root: Path) -> list[tuple[Path, str | None]]:
    """(folder of class folders, its split): ``root/<split>`` for a root of split folders, else
    ``root`` itself with no split of its own."""
    tops = visible_folders(root)
    split_tops = [t for t in tops if t.lower() in SPLIT_FOLDERS]
    if split_tops and len(split_tops) == len(tops):
        loose = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
        if loose:
            logger.info(f"skipped {len(loose)} file(s) directly in {root}, beside its split folders", extra=MAKE_SHARDS)
        return [(root / t, SPLIT_FOLDERS[t.lower()]) for t in split_tops]
    if split_tops:
        raise ShardError(f"{root} mixes split folders {split_tops} with other folders "
                         f"{[t for t in tops if t not in split_tops]}: use root/<class>/... or root/<split>/<class>/...")
    return [(root, None)]


def class_files(class_roots: list[tuple[Path, str | None]], root: Path) -> list[tuple[Path, str, str | None]]:
    """(image, class folder, split) for the images under each ``<base>/<class>/...``. Files that are
    not images, hidden files and images outside a class folder are counted and printed."""
    entries, skipped, hidden = [], collections.Counter(), []
    for base, split_of in class_roots:
        files, hid = _walk_files(base)
        hidden += hid
        for p in files:
            rel = p.relative_to(base).parts
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                skipped[f"{p.suffix.lower() or 'no suffix'} files"] += 1
            elif len(rel) < 2:
                skipped[f"images directly in {base} (not in a class folder)"] += 1
            else:
                entries.append((p, rel[0], split_of))
    if skipped or hidden:
        what = [f"{n} {k}" for k, n in sorted(skipped.items())] + ([f"{len(hidden)} hidden"] if hidden else [])
        logger.info(f"skipped {', '.join(what)} under {root} (images: {', '.join(IMAGE_SUFFIXES)})", extra=MAKE_SHARDS)
    if not entries:
        raise ShardError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in class sub-folders of {root}")
    return entries


def folder_files(root: str | Path) -> list[tuple[Path, str, str | None]]:
    """(image, class folder, split folder's split or ``None``) for an image folder (see ``folder_items``)."""
    root = Path(root)
    check_folder(root)
    return class_files(_class_roots(root), root)


def items_from_files(entries: list[tuple[Path, str, str | None]], root: Path, label_map: LabelMap,
                     fold_case: bool = False) -> list[Item]:
    """Items of (image, raw label, split) entries, their ids relative to ``root``. Raw labels are
    mapped before any image is read, so unknown ones fail first; with ``fold_case`` they match the
    map's labels whatever their case (the raw label is kept as written)."""
    raws = [raw for _, raw, _ in entries]
    if fold_case:
        spelled = {k.lower(): k for k in [*label_map.mapping, *label_map.unlabeled]}
        nodes = label_map.map([spelled.get(r.lower(), r) for r in raws])
    else:
        nodes = label_map.map(raws)
    return [Item(p, raw, node, split, p.relative_to(root).as_posix())
            for (p, raw, split), node in zip(entries, nodes)]


def read_folder(root: str | Path, label_map: LabelMap) -> list[Item]:
    """``folder_items`` before splits are chosen: items of a root without split folders have none."""
    return items_from_files(folder_files(root), Path(root), label_map)


def folder_items(root: str | Path, label_map: LabelMap, split: str | None = None,
                 spec: SplitSpec | None = None) -> list[Item]:
    """Items of an image folder, as torchvision's ImageFolder reads one: ``root/<class>/.../<image>``,
    the class being the folder right under ``root`` (images may sit in deeper folders, e.g. one per
    patient; symlinked folders are followed). A root whose folders are all split names (``train``,
    ``val``/``valid``/``validation``, ``test``) is read as ``root/<split>/<class>/...``, each image in
    its folder's split; other roots take ``split`` (default train) or splits drawn by ``spec``.

    Raw labels are mapped before any image is read, so unknown labels fail first. Files that are
    not images, and images outside a class folder, are counted and listed, never dropped silently.
    """
    return finish_splits(read_folder(root, label_map), f"image folder {root}", split, spec)


def read_csv(csv_path: str | Path, label_map: LabelMap) -> list[Item]:
    """Items of a CSV with columns ``path,label[,split]`` (paths relative to the CSV, which are also
    the image ids; an empty label is an unlabelled image, an empty split none yet). A UTF-8 byte-order
    mark (Excel) is accepted."""
    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ShardError(f"{csv_path}: missing column(s) {sorted(missing)}; expected path,label[,split], got {reader.fieldnames}")
        rows = list(reader)
    entries = []
    for i, row in enumerate(rows, start=2):
        if None in row:  # DictReader's key for fields beyond the header
            raise ShardError(f"{csv_path}:{i}: {len(row[None])} more field(s) than the header has: {row[None]!r}")
        if row["label"] is None:  # a short row: the label field is missing, not empty
            raise ShardError(f"{csv_path}:{i}: too few fields (expected path,label[,split]); "
                             "write an empty label as path, (a trailing comma) for an unlabelled image")
        path = (row["path"] or "").strip()
        if not path:
            raise ShardError(f"{csv_path}:{i}: empty path")
        split = (row.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            raise ShardError(f"{csv_path}:{i}: split {split!r} is not one of {SPLITS}")
        entries.append((path, row["label"].strip() or None, split))
    nodes = label_map.map([raw for _, raw, _ in entries])
    return [Item(csv_path.parent / path, raw, node, split, Path(path).as_posix())
            for (path, raw, split), node in zip(entries, nodes)]


def csv_items(csv_path: str | Path, label_map: LabelMap, default_split: str | None = None,
              spec: SplitSpec | None = None) -> list[Item]:
    """Items of a CSV ``path,label[,split]`` (``read_csv``); rows without a split take
    ``default_split`` (default train) or splits drawn by ``spec``."""
    return finish_splits(read_csv(csv_path, label_map), f"CSV {csv_path}", default_split, spec)


# -- splits: a pure function of (image id or group, seed) -----------------------------------------

@dataclass(frozen=True)
class SplitSpec:
    """Fractions of train/val/test for a dataset without splits of its own. Each image's split is a
    function of its id (or its ``group_by`` group) and ``seed`` only, so adding images moves none."""

    fractions: tuple[float, float, float]
    seed: int = 0
    group_by: str | None = None


def parse_split_fractions(text: str) -> tuple[float, float, float]:
    """``"0.6,0.2,0.2"`` -> (0.6, 0.2, 0.2): three fractions in [0, 1] that sum to 1."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ShardError(f"--split-fractions {text!r}: expected three numbers TRAIN,VAL,TEST, e.g. 0.6,0.2,0.2")
    if not all(0.0 <= v <= 1.0 for v in values):
        raise ShardError(f"--split-fractions {text!r}: each fraction must lie between 0 and 1")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ShardError(f"--split-fractions {text!r}: the fractions sum to {sum(values):g}, not 1")
    return values  # type: ignore[return-value]


def split_point(key: str, seed: int) -> float:
    """A uniform number in [0, 1) from a hash of (seed, key): the same on every machine and run."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def split_at(point: float, fractions: tuple[float, float, float]) -> str:
    """The split whose share of [0, 1) holds ``point`` (train first); the last split with a
    non-zero fraction takes the rounding remainder, so a zero fraction is never drawn."""
    last = max(i for i, f in enumerate(fractions) if f > 0)
    edge = 0.0
    for i, (name, fraction) in enumerate(zip(SPLITS, fractions)):
        edge += fraction
        if fraction > 0 and (point < edge or i == last):
            return name
    raise AssertionError("unreachable: some fraction is positive")


def group_key(image_id: str, pattern: re.Pattern, where: Path | str) -> str:
    """The group of an image: the first capture group of ``pattern`` searched in its id, or the
    whole match for a pattern without groups."""
    m = pattern.search(image_id)
    if m is None:
        raise ShardError(f"{where}: --group-by {pattern.pattern!r} does not match its id {image_id!r}")
    return m.group(1) if pattern.groups and m.group(1) is not None else m.group(0)


def assign_splits(items: list[Item], spec: SplitSpec) -> list[Item]:
    """Items with their splits drawn by ``spec`` (per image, or per group with ``group_by``)."""
    try:
        pattern = re.compile(spec.group_by) if spec.group_by is not None else None
    except re.error as e:
        raise ShardError(f"--group-by {spec.group_by!r} is not a regular expression ({e})") from None
    out = []
    for item in items:
        key = group_key(item.image_id, pattern, item.image if isinstance(item.image, Path) else item.image_id) \
            if pattern is not None else item.image_id
        out.append(item._replace(split=split_at(split_point(key, spec.seed), spec.fractions)))
    return out


def finish_splits(items: list[Item], where: str, split: str | None = None,
                  spec: SplitSpec | None = None) -> list[Item]:
    """Items all with a split: a dataset's own splits are kept (and then ``split`` or ``spec`` is an
    error), others take ``split``, or splits drawn by ``spec``, or train."""
    if split is not None and spec is not None:
        raise ShardError(f"{where}: give --split {split} or --split-fractions, not both")
    own = sorted({item.split for item in items if item.split is not None}, key=SPLITS.index)
    if own and (split is not None or spec is not None):
        flag = f"--split {split}" if split is not None else "--split-fractions"
        raise ShardError(f"{where} has splits of its own ({', '.join(own)}), so each image keeps its split: drop {flag}")
    if spec is not None:
        return assign_splits(items, spec)
    return [item if item.split is not None else item._replace(split=split or "train") for item in items]


def write_items(items: list[Item], uri: str, name: str, label_map: LabelMap, skip_bad: bool = False,
                hierarchy=None, target_file_mb: float = 128.0,
                options: StorageOptions | None = None) -> Manifest:
    """Images and their tree nodes as a dataset; the manifest holds the ``Hierarchy`` the labels were
    mapped to, tree included (``extra["hierarchy_tree"]``): evaluating the set needs no file of it."""
    records = _load_images(items, label_map.source, skip_bad, uri)
    lm = {"source": label_map.source, "file": label_map.file, "mapping": label_map.mapping,
          "unlabeled": sorted(label_map.unlabeled)}
    extra = {"hierarchy_tree": hierarchy.to_dict()} if hierarchy is not None else None
    return write_dataset(records, uri, name, label_map.source, lm, hierarchy and hierarchy.name, target_file_mb,
                         options=options, extra=extra)
