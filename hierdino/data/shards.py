"""The shard format: Parquet files of encoded images plus a ``manifest.json`` per dataset.

Columns: ``image`` (PNG/JPEG bytes), ``image_id``, ``source`` (dataset name), ``raw_label``
(nullable), ``label`` (nullable node name), ``split`` (train/val/test). Labels are node *names*,
resolved to indices against the run's hierarchy at train time.

Writers here are pure pyarrow; ``jobs/make_shards.py`` is the CLI over them (image folders,
``path,label[,split]`` CSVs, the synthetic suite).
"""

from __future__ import annotations

import collections
import csv
import functools
import io
import json
import os
import re
import secrets
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from hierdino import storage
from hierdino.data.crops import HIGH_DEPTH_MODES, to_8bit
from hierdino.storage import StorageOptions
from hierdino.labels import LabelMap

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


class ShardError(ValueError):
    """Bad input to the shard writers (unreadable images, bad CSV rows, bad splits)."""


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
    return Manifest(**data)


def shard_paths(uri: str, options: StorageOptions | None = None) -> list[str]:
    """Filesystem paths of the dataset's shards, as listed in its manifest."""
    m = read_manifest(uri, options)
    _, root = storage.resolve(uri, options)
    return [f"{root}/{s}" for s in m.shards]


def write_dataset(records: Iterable[Record], uri: str, name: str, source: str, label_map: dict | None = None,
                  hierarchy: str | None = None, target_file_mb: float = 128.0, row_group_rows: int = 256,
                  options: StorageOptions | None = None, extra: dict | None = None) -> Manifest:
    """Write records as Parquet shards of about ``target_file_mb`` plus ``manifest.json``.

    The manifest is written last, so a dataset without one is incomplete and readers refuse it. Over
    an existing dataset, the new shards get names of their own (``shard-<write>-<i>.parquet``) and
    the manifest is replaced last: a write that fails (a bad image, a cut connection) leaves the
    earlier dataset whole and its own shards deleted; one that succeeds deletes the earlier shards.
    """
    fs, root = storage.resolve(uri, options)
    if isinstance(fs, storage.pafs.LocalFileSystem):
        os.makedirs(root, exist_ok=True)
    write_id = secrets.token_hex(4)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    shards: list[str] = []
    row_groups: list[int] = []
    target = int(target_file_mb * 2 ** 20)
    batch: list[Record] = []
    writer, writer_bytes, n = None, 0, 0

    def flush_batch():
        nonlocal writer, writer_bytes
        if not batch:
            return
        table = pa.Table.from_pylist([r.__dict__ for r in batch], schema=SCHEMA)
        if writer is None:
            shards.append(f"shard-{write_id}-{len(shards):05d}.parquet")
            row_groups.append(0)
            stream = storage.with_retries(lambda: fs.open_output_stream(f"{root}/{shards[-1]}"),
                                          storage.join(uri, shards[-1]), "write")
            writer = pq.ParquetWriter(stream, SCHEMA, compression="none")
            writer._hierdino_stream = stream  # closed with the writer
            writer_bytes = 0
        writer.write_table(table, row_group_size=row_group_rows)  # one row group: len(batch) <= row_group_rows
        row_groups[-1] += 1
        writer_bytes += table.nbytes
        batch.clear()
        if writer_bytes >= target:
            close_writer()

    def close_writer():
        nonlocal writer
        if writer is not None:
            writer.close()
            writer._hierdino_stream.close()
            writer = None

    try:
        for r in records:
            if r.split not in SPLITS:
                raise ShardError(f"image {r.image_id!r}: split {r.split!r} is not one of {SPLITS}")
            counts[r.split][r.label if r.label is not None else UNLABELED] += 1
            batch.append(r)
            n += 1
            if len(batch) >= row_group_rows:
                flush_batch()
        flush_batch()
        close_writer()
        if n == 0:
            raise ShardError(f"no images to write for dataset {name!r}")
    except BaseException:
        for cleanup in [close_writer] + [functools.partial(storage.delete_file, storage.join(uri, s), options)
                                         for s in shards]:  # this write's own files: an earlier dataset stays
            try:
                cleanup()
            except Exception:  # best effort: the error that stopped the write is the one to report
                pass
        raise
    manifest = Manifest(name=name, source=source, num_images=n,
                        counts={s: dict(sorted(c.items())) for s, c in counts.items()},
                        label_map=label_map or {}, shards=shards, row_groups=row_groups, hierarchy=hierarchy,
                        extra=extra or {})
    storage.write_bytes(storage.join(uri, "manifest.json"), manifest.to_json().encode(), options)
    for old in storage.list_files(uri, ".parquet", options):  # an earlier write's shards, now unlisted
        folder, base = old.rsplit("/", 1)
        if folder == root.rstrip("/") and base.startswith("shard-") and base not in shards:
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

def _check_image(path: Path) -> bytes:
    """Bytes of an image that PIL can decode: PNG/JPEG kept as they are, other formats (TIFF, BMP,
    WebP, GIF) and 16-bit images re-encoded as 8-bit PNG (``crops.to_8bit``)."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.format in ("PNG", "JPEG") and im.mode not in HIGH_DEPTH_MODES + ("F",):
            return data
        im8 = to_8bit(im)
        buf = io.BytesIO()
        (im8 if im8.mode in ("L", "RGB") else im8.convert("RGB")).save(buf, format="PNG")
        return buf.getvalue()


def _load_images(items: list[tuple[Path, str | None, str | None, str]], source: str, skip_bad: bool,
                 uri: str = "") -> Iterator[Record]:
    """Records of the readable images, streamed (one image in memory at a time).

    Unreadable images are collected; at the end they fail the dataset (after its shards, before its
    manifest, so the incomplete dataset is refused by readers) or, with ``skip_bad``, are listed.
    """
    bad: list[str] = []
    for path, raw, label, split in items:
        try:
            data = _check_image(path)
        except Exception as e:  # PIL raises many types for broken files
            bad.append(f"{path} ({type(e).__name__}: {re.sub(r'<_io.BytesIO object at 0x[0-9a-f]+>', 'the file', str(e))})")
            continue
        yield Record(data, str(path), source, raw, label, split)
    if bad and not skip_bad:
        raise ShardError(f"{len(bad)} unreadable image(s), so nothing was written to {uri or 'the dataset'} (a dataset "
                         "already there is unchanged); fix them or pass --skip-bad to skip them:\n  " + "\n  ".join(bad))
    if bad:
        print(f"skipped {len(bad)} unreadable image(s):\n  " + "\n  ".join(bad))


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


def folder_items(root: str | Path, label_map: LabelMap, split: str | None = None) -> list[tuple]:
    """(path, raw label, node, split) for an image folder, as torchvision's ImageFolder reads one:
    ``root/<class>/.../<image>``, the class being the folder right under ``root`` (images may sit
    in deeper folders, e.g. one per patient; symlinked folders are followed). A root whose folders
    are all split names (``train``, ``val``/``valid``/``validation``, ``test``) is read as
    ``root/<split>/<class>/...``, each image in its folder's split; ``split`` names the split of a
    root without split folders (default train) and must not be given for one with them.

    Raw labels are mapped before any image is read, so unknown labels fail first. Files that are
    not images, and images outside a class folder, are counted and listed, never dropped silently.
    """
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"image folder {root} does not exist" if not str(root).startswith("s3:")
                         else f"image folder {root}: make_shards reads image folders from local disk, not S3; "
                              "copy them locally first (e.g. aws s3 sync)")
    tops = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "__MACOSX")
    split_tops = [t for t in tops if t.lower() in SPLIT_FOLDERS]
    if split_tops and len(split_tops) == len(tops):
        loose = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
        if loose:
            print(f"make_shards: skipped {len(loose)} file(s) directly in {root}, beside its split folders")
        if split is not None:
            raise ShardError(f"{root} holds split folders {split_tops}, so each image takes its folder's split; "
                             f"drop --split {split}")
        class_roots = [(root / t, SPLIT_FOLDERS[t.lower()]) for t in split_tops]
    elif split_tops:
        raise ShardError(f"{root} mixes split folders {split_tops} with other folders "
                         f"{[t for t in tops if t not in split_tops]}: use root/<class>/... or root/<split>/<class>/...")
    else:
        class_roots = [(root, split or "train")]
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
        print(f"make_shards: skipped {', '.join(what)} under {root} (images: {', '.join(IMAGE_SUFFIXES)})")
    if not entries:
        raise ShardError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in class sub-folders of {root}")
    nodes = label_map.map([raw for _, raw, _ in entries])
    return [(p, raw, node, s) for (p, raw, s), node in zip(entries, nodes)]


def csv_items(csv_path: str | Path, label_map: LabelMap, default_split: str = "train") -> list[tuple]:
    """(path, raw label, node, split) from a CSV with columns ``path,label[,split]`` (paths relative to
    the CSV; an empty label is an unlabelled image). A UTF-8 byte-order mark (Excel) is accepted."""
    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ShardError(f"{csv_path}: missing column(s) {sorted(missing)}; expected path,label[,split], got {reader.fieldnames}")
        rows = list(reader)
    items = []
    for i, row in enumerate(rows, start=2):
        if None in row:  # DictReader's key for fields beyond the header
            raise ShardError(f"{csv_path}:{i}: {len(row[None])} more field(s) than the header has: {row[None]!r}")
        if row["label"] is None:  # a short row: the label field is missing, not empty
            raise ShardError(f"{csv_path}:{i}: too few fields (expected path,label[,split]); "
                             "write an empty label as path, (a trailing comma) for an unlabelled image")
        path = (row["path"] or "").strip()
        if not path:
            raise ShardError(f"{csv_path}:{i}: empty path")
        split = (row.get("split") or default_split).strip()
        if split not in SPLITS:
            raise ShardError(f"{csv_path}:{i}: split {split!r} is not one of {SPLITS}")
        raw = row["label"].strip() or None
        items.append((csv_path.parent / path, raw, split))
    nodes = label_map.map([raw for _, raw, _ in items])
    return [(p, raw, node, split) for (p, raw, split), node in zip(items, nodes)]


def write_items(items: list[tuple], uri: str, name: str, label_map: LabelMap, skip_bad: bool = False,
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
