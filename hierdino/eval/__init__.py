"""Evaluation of frozen backbones on external datasets (probes, metrics, reports, comparisons)."""

OBJECTIVE = "ext_val_bacc"  # what sweeps optimise: mean balanced accuracy over the external val splits (eval.live)


class EvalDataError(ValueError):
    """An external set that the probes cannot score (missing split, fewer than two classes)."""


def check_probe_sets(uris: list[str], split: str, options=None) -> None:
    """Every external set must have labelled ``train`` rows of at least two classes (the probes fit on
    them) and labelled ``split`` rows (scored); read from the manifests, before any cluster work."""
    from hierdino.data import shards  # pyarrow: not for importing OBJECTIVE

    problems = []
    for uri in uris:
        m = shards.read_manifest(uri, options)
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
