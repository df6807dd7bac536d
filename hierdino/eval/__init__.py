"""Evaluation of frozen backbones on external datasets (probes, metrics, reports, comparisons)."""

OBJECTIVE = "ext_val_bacc"  # what sweeps optimise: mean balanced accuracy over the external val splits (eval.live)
