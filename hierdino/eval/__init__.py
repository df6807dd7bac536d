"""Evaluation of frozen backbones on external datasets (probes, metrics, reports, comparisons)."""

from hierdino.errors import UserError

OBJECTIVE = "ext_val_bacc"  # what sweeps optimise: mean balanced accuracy over the external val splits (eval.live)


class EvalDataError(UserError, ValueError):
    """An external set that the probes cannot score (missing split, fewer than two classes)."""

    kind = "eval data"
