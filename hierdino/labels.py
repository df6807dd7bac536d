"""Label maps: ``(source dataset, raw label) -> hierarchy node name``.

The packaged map (``hierdino/hierarchies/label_maps.yaml``) holds one mapping per source dataset
(``matek_aml_2019``, ``raabin_wbc`` ...). A source may list raw labels under ``unlabeled``: such
images carry no class (artefacts, "other") and map to ``None``. Any raw label not in the map is an
error that names every unknown label with its count, so a whole dataset is checked in one pass.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import yaml

from hierdino import packaged
from hierdino.errors import UserError
from hierdino.hierarchy import HIERARCHIES, Hierarchy

PACKAGED = "hierdino/hierarchies/label_maps.yaml"


class LabelMapError(UserError, ValueError):
    """Unknown raw labels, unknown sources, or a map whose targets are not nodes of the hierarchy."""

    kind = "label map"


@dataclass
class LabelMap:
    """The mapping of one source dataset."""

    source: str
    mapping: dict[str, str]
    unlabeled: frozenset[str] = field(default_factory=frozenset)
    file: str = PACKAGED

    def check_hierarchy(self, hierarchy: Hierarchy) -> None:
        """Every target must be a node of ``hierarchy``; all offenders are named at once."""
        bad = sorted({t for t in self.mapping.values() if t not in hierarchy})
        if bad:
            raise LabelMapError(
                f"label map {self.source!r} ({self.file}) maps to {len(bad)} name(s) that are not nodes of "
                f"hierarchy {hierarchy.name!r}: {', '.join(bad)}"
            )

    def map(self, raw_labels: Iterable[str | None]) -> list[str | None]:
        """Map raw labels to node names (``None`` for unlabelled); raise naming every unknown label."""
        raw = list(raw_labels)
        unknown = collections.Counter(
            r for r in raw if r is not None and r not in self.mapping and r not in self.unlabeled
        )
        if unknown:
            listed = ", ".join(f"{lab!r} ({n})" for lab, n in sorted(unknown.items()))
            raise LabelMapError(
                f"{sum(unknown.values())} image(s) of source {self.source!r} have {len(unknown)} raw label(s) not in "
                f"the label map ({self.file}): {listed}. Known labels: {sorted(self.mapping)}"
            )
        return [None if r is None or r in self.unlabeled else self.mapping[r] for r in raw]


def load_label_maps(path: str | Path | None = None) -> dict[str, LabelMap]:
    """All label maps in a YAML file (the packaged one by default)."""
    if path is None:
        text, file = packaged.read_text("label_maps", HIERARCHIES)[0], PACKAGED
    else:
        text, file = Path(path).read_text(), str(path)
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise LabelMapError(f"{file}: expected a mapping of source -> {{raw label: node}}")
    maps = {}
    for source, entries in data.items():
        if not isinstance(entries, dict):
            raise LabelMapError(f"{file}: source {source!r} must map raw labels to node names, got {entries!r}")
        entries = dict(entries)
        unlabeled = entries.pop("unlabeled", None) or []
        if isinstance(unlabeled, str):  # "unlabeled: ART": one raw label, not its letters
            unlabeled = [unlabeled]
        if not isinstance(unlabeled, list) or not all(isinstance(u, str) for u in unlabeled):
            raise LabelMapError(f"{file}: source {source!r}: 'unlabeled' must be a list of raw labels (quoted "
                                f"strings), got {unlabeled!r}")
        # YAML reads 01 as 1 and yes/no/on/off as booleans: a raw label that is not a string would then
        # never match the folder or CSV value it was written for.
        odd = [f"{k!r}: {v!r}" for k, v in entries.items() if not isinstance(k, str) or not isinstance(v, str)]
        if odd:
            raise LabelMapError(f"{file}: source {source!r}: raw labels and node names must be strings, but YAML "
                                f"read {', '.join(odd)}; quote them (e.g. \"01\": lymphocyte, \"yes\": ...)")
        maps[str(source)] = LabelMap(str(source), dict(entries), frozenset(unlabeled), file)
    return maps


def get_label_map(source: str, hierarchy: Hierarchy | None = None, path: str | Path | None = None) -> LabelMap:
    """The map of ``source``, checked against ``hierarchy`` when given."""
    maps = load_label_maps(path)
    if source not in maps:
        raise LabelMapError(
            f"no label map for source {source!r} in {path or PACKAGED}; known sources: {sorted(maps)}"
        )
    lm = maps[source]
    if hierarchy is not None:
        lm.check_hierarchy(hierarchy)
    return lm


def map_labels(source: str, raw_labels: Iterable[str | None], hierarchy: Hierarchy | None = None,
               path: str | Path | None = None) -> list[str | None]:
    """``(source, raw label) -> node name | None`` for a whole list of labels."""
    return get_label_map(source, hierarchy, path).map(raw_labels)
