"""Readers of public white blood cell datasets in their published layouts (``make_shards.py <layout>``).

Each reader returns ``shards.Item``s whose split is the dataset's own (published train/test
folders, BloodMNIST's arrays) or ``None`` (``shards.finish_splits`` then gives train or draws splits
by ``--split-fractions``). Image ids are paths relative to the root given. Labels go through the
layout's label map in ``hierarchies/label_maps.yaml``; ``LAYOUTS`` names it per tree.

  pbc                 PBC_dataset_normal_DIB/<folder>/<PREFIX>_<id>.jpg (Acevedo et al. 2020)
  kaggle-blood-cells  dataset2-master/images/{TRAIN,TEST,TEST_SIMPLE}/<CLASS>/*.jpeg (Kaggle "blood cells")
  raabin              {Train,TestA,TestB}/<Class>/*.jpg (Raabin-WBC cropped cells)
  lisc                LISC Database/Main Dataset/<class>/*.bmp (LISC)
  bloodmnist          bloodmnist.npz (MedMNIST v2)
  matek               AML-Cytomorphology_LMU/<CODE>/<CODE>_0001.tiff (Matek et al. 2019): ``folder``
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hierdino.data import shards
from hierdino.data.shards import MAKE_SHARDS, Item, ShardError
from hierdino.labels import LabelMap, LabelMapError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """A public dataset's layout: its default tree and its label map per tree."""

    hierarchy: str  # the default tree
    sources: dict[str, str]  # tree name -> label map; other trees get the default tree's map
    help: str


LAYOUTS: dict[str, Layout] = {
    "pbc": Layout("wbc-h2", {"wbc-h2": "pbc", "wbc-h1": "pbc_h1"},
                  "PBC (Acevedo et al. 2020): folder + file-name prefix"),
    "kaggle-blood-cells": Layout("wbc-h1", {"wbc-h1": "kaggle_blood_cells"},
                                 "Kaggle 'blood cells' (BCCD crops, 4 classes): images/TRAIN|TEST|TEST_SIMPLE"),
    "raabin": Layout("wbc-h1", {"wbc-h1": "raabin_wbc"}, "Raabin-WBC cropped cells: Train|TestA|TestB/<Class>"),
    "lisc": Layout("wbc-h1", {"wbc-h1": "lisc"}, "LISC: Main Dataset/<class>/*.bmp"),
    "bloodmnist": Layout("wbc-h2", {"wbc-h2": "bloodmnist", "wbc-h1": "bloodmnist_h1"},
                         "BloodMNIST (MedMNIST v2) .npz, its own train/val/test"),
    "matek": Layout("wbc-h1", {"wbc-h1": "matek_aml_2019"}, "Matek 2019 AML-Cytomorphology_LMU/<CODE>/*.tiff"),
}


def source_for(layout: str, hierarchy: str) -> str:
    """The label map of ``layout`` for the tree named ``hierarchy``."""
    spec = LAYOUTS[layout]
    return spec.sources.get(hierarchy, spec.sources[spec.hierarchy])


def child(root: Path, name: str) -> Path | None:
    """The folder ``name`` right under ``root``, whatever its case; ``None`` if there is none."""
    found = [root / d for d in shards.visible_folders(root) if d.lower() == name.lower()]
    return found[0] if found else None


# -- PBC: the folder gives the coarse type, the file-name prefix the finest known label ---------

PBC_NAME = re.compile(r"([A-Za-z]+)_[^_]+")


def _prefix_folders(label_map: LabelMap) -> dict[str, set[str]]:
    """PREFIX -> the folders it may sit in, from a map whose raw labels are ``folder/PREFIX``."""
    homes: dict[str, set[str]] = {}
    for raw in [*label_map.mapping, *label_map.unlabeled]:
        if raw.count("/") != 1:
            raise LabelMapError(f"label map {label_map.source!r} ({label_map.file}): PBC raw labels are "
                                f"folder/PREFIX, got {raw!r}")
        folder, prefix = raw.split("/")
        homes.setdefault(prefix, set()).add(folder)
    return homes


def pbc_items(root: str | Path, label_map: LabelMap) -> list[Item]:
    """PBC images, raw label ``folder/PREFIX`` (e.g. ``neutrophil/BNE``). A prefix the map knows
    under another folder (``neutrophil/MY_1.jpg``) is an error naming the file."""
    root = Path(root)
    homes = _prefix_folders(label_map)
    entries = []
    for path, folder, split in shards.folder_files(root):
        m = PBC_NAME.fullmatch(path.stem)
        if m is None:
            raise ShardError(f"{path}: not a PBC file name <PREFIX>_<id> (e.g. BNE_1234.jpg)")
        prefix = m.group(1)
        if prefix in homes and folder not in homes[prefix]:
            raise ShardError(f"{path}: prefix {prefix} belongs in folder {'/'.join(sorted(homes[prefix]))}/, "
                             f"not {folder}/")
        entries.append((path, f"{folder}/{prefix}", split))
    return shards.items_from_files(entries, root, label_map)


# -- published split folders: Kaggle blood cells, Raabin-WBC ------------------------------------

KAGGLE_SPLITS = {"TRAIN": "train", "TEST": "test", "TEST_SIMPLE": None}
RAABIN_SPLITS = {"Train": "train", "TestA": "test", "TestB": None}


def split_folder_items(root: str | Path, label_map: LabelMap, folders: dict[str, str | None]) -> list[Item]:
    """Items of ``root/<split folder>/<class>/...``: ``folders`` maps each published split folder
    (any case) to its split, or to ``None`` for one skipped (and said so). Class folders match the
    map's labels whatever their case."""
    root = Path(root)
    shards.check_folder(root)
    tops = shards.visible_folders(root)
    known = {name.lower(): split for name, split in folders.items()}
    unknown = [t for t in tops if t.lower() not in known]
    if unknown or not tops:
        raise ShardError(f"{root}: expected the folders {', '.join(folders)} (any case), found "
                         f"{', '.join(tops) or 'none'}")
    skipped = [t for t in tops if known[t.lower()] is None]
    if skipped:
        logger.info(f"skipped folder(s) {', '.join(skipped)} of {root} (not part of this layout's splits)", extra=MAKE_SHARDS)
    bases = [(root / t, known[t.lower()]) for t in tops if known[t.lower()] is not None]
    if not bases:
        raise ShardError(f"{root}: none of the folders {', '.join(n for n, s in folders.items() if s)} holds images")
    return shards.items_from_files(shards.class_files(bases, root), root, label_map, fold_case=True)


def kaggle_items(root: str | Path, label_map: LabelMap) -> list[Item]:
    """Kaggle "blood cells" (``dataset2-master/images``): TRAIN -> train, TEST -> test; TEST_SIMPLE,
    a few unaugmented images of the same cells, is skipped."""
    return split_folder_items(root, label_map, KAGGLE_SPLITS)


def raabin_items(root: str | Path, label_map: LabelMap) -> list[Item]:
    """Raabin-WBC cropped cells: Train -> train, TestA -> test; TestB (other microscopes and
    cameras) is skipped: write it as a set of its own with ``folder --root .../TestB``."""
    return split_folder_items(root, label_map, RAABIN_SPLITS)


# -- LISC ---------------------------------------------------------------------------------------

def lisc_items(root: str | Path, label_map: LabelMap) -> list[Item]:
    """LISC: ``root`` is ``LISC Database`` (its ``Main Dataset`` is read, ``Ground Truth
    Segmentation`` is not) or ``Main Dataset`` itself, which the ids are relative to; class folders
    match the map in any case."""
    root = Path(root)
    shards.check_folder(root)
    main = child(root, "Main Dataset")
    if main is not None:
        others = [t for t in shards.visible_folders(root) if t != main.name]
        if others:
            logger.info(f"read {main.name} of {root}, skipped its folder(s) {', '.join(others)} (masks)", extra=MAKE_SHARDS)
        base = main
    elif any(t.lower().startswith("ground truth") for t in shards.visible_folders(root)):
        raise ShardError(f"{root} holds a ground-truth folder but no 'Main Dataset': give the LISC Database "
                         "folder or its Main Dataset")
    else:
        base = root
    return shards.items_from_files(shards.class_files([(base, None)], base), base, label_map, fold_case=True)


# -- BloodMNIST (MedMNIST .npz) ------------------------------------------------------------------

BLOODMNIST_CLASSES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil",
                      "platelet")


def _npz_split(arrays: dict[str, np.ndarray], split: str, npz: Path,
               classes: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
    """The images of one split of a MedMNIST file and their class names, checked."""
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ShardError(f"{npz}: {split}_images must be uint8 [N,H,W] or [N,H,W,C], got {images.dtype} "
                         f"{list(images.shape)}")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != len(images):
        raise ShardError(f"{npz}: {split}_labels must be [N] or [N,1] with N = {len(images)} images, got "
                         f"{list(labels.shape)}")
    bad = [int(v) for v in labels if not 0 <= int(v) < len(classes)]
    if bad:
        raise ShardError(f"{npz}: {split}_labels holds {len(bad)} value(s) outside 0..{len(classes) - 1}, "
                         f"e.g. {bad[0]}")
    return images, [classes[int(v)] for v in labels]


def npz_items(npz: str | Path, label_map: LabelMap, classes: tuple[str, ...] = BLOODMNIST_CLASSES) -> list[Item]:
    """A MedMNIST ``.npz`` (``train_images``/``train_labels``, ``val_...``, ``test_...``), its own
    splits kept; raw labels are the class names (``classes``, in label-index order), ids
    ``<split>_images/<index>``. Images are stored as PNG."""
    npz = Path(npz)
    if not npz.is_file():
        raise ShardError(f"{npz} does not exist")
    with np.load(npz) as z:
        arrays = {k: z[k] for k in z.files}
    missing = [f"{s}_{kind}" for s in shards.SPLITS for kind in ("images", "labels") if f"{s}_{kind}" not in arrays]
    if missing:
        raise ShardError(f"{npz}: missing array(s) {', '.join(missing)} (found {', '.join(sorted(arrays))})")
    items = []
    for split in shards.SPLITS:
        images, raws = _npz_split(arrays, split, npz, classes)
        nodes = label_map.map(raws)
        items += [Item(images[i], raws[i], nodes[i], split, f"{split}_images/{i}") for i in range(len(images))]
    return items


READERS = {"pbc": pbc_items, "kaggle-blood-cells": kaggle_items, "raabin": raabin_items, "lisc": lisc_items,
           "bloodmnist": npz_items, "matek": shards.read_folder}


def layout_items(layout: str, where: str, label_map: LabelMap, spec: shards.SplitSpec | None) -> list[Item]:
    """The images of a published layout at ``where`` (a folder, or BloodMNIST's .npz), each with its
    split: the layout's own, else drawn by ``spec`` (``shards.finish_splits``)."""
    return shards.finish_splits(READERS[layout](where, label_map), f"{layout} {where}", None, spec)
