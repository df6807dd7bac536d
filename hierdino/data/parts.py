"""Labels at mixed depths from one labelled set: its train split cut into fine, coarse and unlabelled parts.

Reproduction v3 (``hierdino/presets/repro/v3/base.yaml``) asks whether the tree in the loss lets a
model learn from images labelled only at a coarse node. It needs one training set whose images carry
labels at different depths, in known proportions:

- **fine**: a share of each leaf's images, keeping the leaf label;
- **coarse**: a share of each leaf's images, the label moved up to its ancestor at ``depth`` (a leaf
  shallower than ``depth`` stays itself), plus every image the source labels only at an internal
  node (PBC's ``NEUTROPHIL_*``, ``IG_*``), which keeps its own label;
- **unlabelled**: the rest of each leaf's images, and the source's unlabelled images, with no label.

The cut is stratified per leaf and seeded: each leaf's images are ordered by
``shards.split_point(image_id, seed)`` and the first ``round(f_fine * n)`` go to fine, the next
``round(f_coarse * n)`` to coarse. The image id alone decides the order, so the same files give the
same parts on every machine, in any row order.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from hierdino.hierarchy import Hierarchy

PARTS = ("fine", "coarse", "unlabelled")


def _split_point(image_id: str, seed: int) -> float:
    from hierdino.data.shards import split_point  # pyarrow: only when the parts are assigned

    return split_point(image_id, seed)


def assign_parts(ids: Sequence[str], labels: Sequence[str | None], hierarchy: Hierarchy,
                 fractions: tuple[float, float] = (0.2, 0.4), seed: int = 0) -> list[str]:
    """The part (one of ``PARTS``) of every image; ``fractions``: the fine and coarse shares of each leaf."""
    f_fine, f_coarse = fractions
    if min(fractions) < 0 or f_fine + f_coarse > 1:
        raise ValueError(f"part fractions (fine, coarse) must be >= 0 and sum to at most 1, got {list(fractions)}")
    if len(set(ids)) != len(ids):
        raise ValueError("image ids must be unique to cut a set into parts")
    unknown = sorted({lab for lab in labels if lab is not None and lab not in hierarchy})
    if unknown:
        raise ValueError(f"labels not in hierarchy {hierarchy.name!r}: {', '.join(unknown)}")
    part = ["unlabelled"] * len(ids)
    per_leaf: dict[str, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        if lab is None:
            continue
        if hierarchy.is_leaf(lab):
            per_leaf[lab].append(i)
        else:
            part[i] = "coarse"  # labelled at an internal node by the source: coarse as it comes
    for rows in per_leaf.values():
        rows.sort(key=lambda i: _split_point(ids[i], seed))
        n_fine, n_coarse = round(f_fine * len(rows)), round(f_coarse * len(rows))
        for k, i in enumerate(rows):
            part[i] = "fine" if k < n_fine else "coarse" if k < n_fine + n_coarse else "unlabelled"
    return part


def part_label(label: str | None, part: str, hierarchy: Hierarchy, depth: int) -> str | None:
    """The label an image carries in its part: the leaf (fine), the ancestor at ``depth`` of a leaf or
    the source's own internal label (coarse), none (unlabelled)."""
    if part == "unlabelled" or label is None:
        return None
    if part == "coarse" and hierarchy.is_leaf(label):
        return hierarchy.at_depth(label, depth)
    return label
