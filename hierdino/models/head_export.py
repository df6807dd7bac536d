"""The supervised head of a run, exported beside its teacher backbone, and read back for predictions.

A run trained with a supervised loss (``loss.supervised``) writes, next to
``export/teacher_backbone.safetensors`` and ``export/model.json``:

- ``export/supervised_head.safetensors``: ``weight [L, D]`` and ``bias [L]`` of the linear leaf
  classifier (``models.heads.SupervisedHead``), L = the tree's leaves, D = the backbone's width;
- ``export/head.json``: the tree (``Hierarchy.to_dict``), the leaf order of the head's outputs, the
  label space (every node name), the preprocessing the backbone expects (input size, centred share
  of each side, normalisation) and which CLS token the head was trained on.

The head was trained on the student's CLS token; the export applies it to the teacher's (its EMA),
the backbone that is exported. ``read_head`` refuses, in one line, a head whose shape or leaf order
does not match its tree or its backbone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from hierdino import storage
from hierdino.hierarchy import Hierarchy, HierarchyError, hierarchy_from_dict

HEAD_WEIGHTS = "supervised_head.safetensors"
HEAD_INFO = "head.json"
FORMAT = 1


@dataclass(frozen=True)
class Head:
    weight: np.ndarray        # [L, D] float32
    bias: np.ndarray          # [L] float32
    hierarchy: Hierarchy
    key: str                  # a hash of the weights and the tree
    uri: str                  # the head.json it was read from


def head_files(weights_uri: str) -> tuple[str, str]:
    """(head weights, head.json) beside an exported backbone's ``.safetensors``."""
    folder = weights_uri.rsplit("/", 1)[0]
    return storage.join(folder, HEAD_WEIGHTS), storage.join(folder, HEAD_INFO)


def write_head(export_uri: str, weight, bias, hierarchy: Hierarchy, preprocessing: dict, options=None) -> str:
    """Write ``supervised_head.safetensors`` and ``head.json`` into the export folder ``export_uri``."""
    import safetensors.torch  # torch: only a training run's export writes heads

    if tuple(weight.shape) != (hierarchy.num_leaves, weight.shape[1]) or tuple(bias.shape) != (hierarchy.num_leaves,):
        raise ValueError(f"supervised head of shape {tuple(weight.shape)} / {tuple(bias.shape)} does not fit the "
                         f"{hierarchy.num_leaves} leaves of hierarchy {hierarchy.name!r}")
    data = safetensors.torch.save({"weight": weight.float().contiguous(), "bias": bias.float().contiguous()})
    storage.write_bytes(storage.join(export_uri, HEAD_WEIGHTS), data, options)
    info = {"format": FORMAT, "weights": HEAD_WEIGHTS, "in_dim": int(weight.shape[1]),
            "leaves": list(hierarchy.leaves), "label_space": list(hierarchy.nodes), "hierarchy": hierarchy.to_dict(),
            "applies_to": "teacher_backbone CLS token (the head trained on the student's)",
            "preprocessing": preprocessing}
    uri = storage.join(export_uri, HEAD_INFO)
    storage.write_bytes(uri, json.dumps(info, indent=2).encode(), options)
    return uri


def has_head(weights_uri: str | None, options=None) -> bool:
    return weights_uri is not None and storage.exists(head_files(weights_uri)[1], options)


def read_head(weights_uri: str, embed_dim: int | None = None, options=None) -> Head:
    """The head exported beside ``weights_uri``; a ``ValueError`` in one line when it does not match
    its tree (outputs, leaf order) or the backbone (``embed_dim``)."""
    from safetensors.numpy import load  # numpy only: predictions need no torch for the head

    w_uri, info_uri = head_files(weights_uri)
    if not storage.exists(info_uri, options):
        raise FileNotFoundError(f"no supervised head beside {weights_uri}: {info_uri} is missing (only runs trained "
                                "with a supervised loss, exported by this version, carry one)")
    try:
        info = json.loads(storage.read_bytes(info_uri, options))
        h = hierarchy_from_dict(info["hierarchy"], info_uri)
        leaves, in_dim = list(info["leaves"]), int(info["in_dim"])
    except (ValueError, KeyError, TypeError, HierarchyError) as e:
        raise ValueError(f"{info_uri} is not a head description ({type(e).__name__}: {e})") from None
    raw = storage.read_bytes(w_uri, options)
    tensors = load(raw)
    weight, bias = tensors.get("weight"), tensors.get("bias")
    problem = None
    if weight is None or bias is None:
        problem = f"{w_uri} holds {sorted(tensors)}, not 'weight' and 'bias'"
    elif leaves != h.leaves:
        problem = f"{info_uri}: its leaf order {leaves[:4]}... is not its tree's {h.leaves[:4]}..."
    elif weight.shape != (h.num_leaves, in_dim) or bias.shape != (h.num_leaves,):
        problem = (f"head/tree mismatch: {w_uri} has {weight.shape[0]} outputs x {weight.shape[1]} inputs, the tree "
                   f"{h.name!r} of {info_uri} {h.num_leaves} leaves and in_dim {in_dim}")
    elif embed_dim is not None and in_dim != embed_dim:
        problem = f"head/backbone mismatch: {w_uri} takes {in_dim}-d CLS tokens, the backbone gives {embed_dim}-d"
    if problem:
        raise ValueError(problem)
    key = hashlib.sha1(raw + json.dumps(info["hierarchy"], sort_keys=True).encode()).hexdigest()[:16]
    return Head(weight.astype(np.float32), bias.astype(np.float32), h, key, info_uri)
