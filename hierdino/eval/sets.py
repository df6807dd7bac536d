"""The external evaluation sets: the class tree each one's labels name, and whether the probes can
use them (read from the manifests, before any cluster work)."""

from __future__ import annotations

from hierdino.data import shards
from hierdino.eval import EvalDataError
from hierdino.hierarchy import hierarchy_from_dict, load_hierarchy, packaged_hierarchies


def set_hierarchy(manifest, uri: str, known: tuple[str, ...] = ()):
    """The tree an external set's labels name: the one its manifest holds (``jobs/make_shards.py``
    stores it); else the packaged tree of the name it records; else the first of ``known`` (names or
    YAML paths: ``--hierarchy``, a run's ``hierarchy.name``) with that name."""
    tree = manifest.extra.get("hierarchy_tree")
    if tree:
        return hierarchy_from_dict(tree, f"{uri}/manifest.json")
    name = manifest.hierarchy or "wbc-h1"
    if name in packaged_hierarchies():
        return load_hierarchy(name)
    for k in known:
        if (h := load_hierarchy(k)).name == name:
            return h
    raise EvalDataError(f"{uri}: its manifest names the hierarchy {name!r}, which is not packaged "
                        f"({', '.join(packaged_hierarchies())}) and not stored in the manifest (written by an earlier "
                        "version): give its YAML file (jobs/evaluate.py --hierarchy FILE; a training run uses its "
                        "hierarchy.name when the names match), or write the set again with jobs/make_shards.py")


def check_probe_sets(uris: list[str], split: str, options=None, known: tuple[str, ...] = ()) -> None:
    """Every external set must have labelled ``train`` rows of at least two classes (the probes fit on
    them) and labelled ``split`` rows (scored), and a hierarchy holding its labels (``set_hierarchy``
    with ``known``); read from the manifests, before any cluster work."""
    problems = []
    for uri in uris:
        m = shards.read_manifest(uri, options)
        try:
            h = set_hierarchy(m, uri, known)
            outside = sorted(lab for lab in m.labels() if lab not in h)
            if outside:
                problems.append(f"{uri}: labels not in its hierarchy {h.name!r}: {', '.join(outside[:10])}")
        except EvalDataError as e:
            problems.append(str(e))
        classes = {lab for lab in m.counts.get("train", {}) if lab != shards.UNLABELED}
        if len(classes) < 2:
            problems.append(f"{uri}: {len(classes)} labelled class(es) in its 'train' split (the probes need 2 or more)")
        if m.num_labeled(split) == 0:
            problems.append(f"{uri}: no labelled '{split}' rows to score (splits: "
                            + ", ".join(f"{s} {m.num_labeled(s)}" for s in m.counts) + ")")
    if problems:
        raise EvalDataError("external evaluation sets the probes cannot use:\n  " + "\n  ".join(problems) +
                            "\nwrite them with train and val/test splits (make_shards folder with train/ val/ test/ "
                            "folders, or csv with a split column), or change eval.datasets / eval.split")
