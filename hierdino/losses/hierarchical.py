"""Supervised losses over a class tree whose targets may be any node (leaf or internal).

Both losses take ``logits[B, n_leaves]`` (leaf order of ``Hierarchy.leaves``) and
``target[B]`` holding indices into ``Hierarchy.nodes`` (leaves first, then internal nodes), with
-1 for unlabelled samples.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from hierdino.hierarchy import Hierarchy, level_weights_for  # beside the tree: the config checks it


def _masked_mean(per_sample: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_sample[valid]`` (0, with the graph alive, when nothing is valid), computed
    without reading anything back to the host. ``per_sample`` must be finite where not valid."""
    v = valid.to(per_sample.dtype)
    return (per_sample * v).sum() / v.sum().clamp_min(1.0)


def _check_targets(loss: nn.Module, target: torch.Tensor, n_nodes: int) -> None:
    """Targets must be -1 or node indices. The check reads a value back from the device (a GPU stall
    per step), so the trainer turns it off (``check_targets = False``): its labels come from the
    ingest's label map, checked against the hierarchy before the run starts."""
    if loss.check_targets and bool(((target < -1) | (target >= n_nodes)).any()):
        raise ValueError(f"targets must be -1 or node indices in [0, {n_nodes}), got {target.tolist()}")


class HierarchicalCrossEntropy(nn.Module):
    """Hierarchical cross-entropy (Bertinetto et al., CVPR 2020) with targets at any tree node.

    Softmax over leaves gives ``p``; ``P(n) = sum of p over the leaves under n`` (``P(root) = 1``).
    For a target t with root path ``a0 = root, a1, ..., ak = t``::

        L(t) = sum_{i=1..k} w[depth(a_i)] * -log( P(a_i) / P(a_{i-1}) )

    With all weights 1 (alpha = 0) the sum telescopes to ``-log P(t)``: flat cross-entropy for a
    leaf, the marginal likelihood of the subtree for an internal node. Computed in log space:
    ``log P(n) = logsumexp(log_softmax(logits)[leaves under n])``, so logits of +-1e4 stay finite.

    Shapes: ``logits[B, n_leaves]``, ``target[B]`` (node indices, -1 = ignore) -> scalar mean over
    the non-ignored samples (0 with a live graph when all are ignored).

    Example::

        h = load_hierarchy("wbc-h1")
        loss_fn = HierarchicalCrossEntropy(h, alpha=0.5, normalize="tree")
        loss = loss_fn(head(cls_tokens), targets)
    """

    def __init__(self, hierarchy: Hierarchy, alpha: float | None = None,
                 level_weights: Sequence[float] | None = None, normalize: str = "none"):
        super().__init__()
        self.hierarchy = hierarchy
        self.check_targets = True
        self.weights = level_weights_for(hierarchy, alpha, level_weights, normalize)
        n = len(hierarchy.nodes)
        # Additive mask: 0 where leaf l is under node n, -inf elsewhere -> logsumexp selects subsets.
        member = hierarchy.leaf_membership()
        self.register_buffer("leaf_mask", torch.where(member, 0.0, float("-inf")), persistent=False)
        # Parent column of each node; index n stands for the root, whose log P is 0.
        parent_idx = [
            n if hierarchy.parent(node) == "root" else hierarchy.index(hierarchy.parent(node))
            for node in hierarchy.nodes
        ]
        self.register_buffer("parent_idx", torch.tensor(parent_idx), persistent=False)
        edge_w = [self.weights[hierarchy.depth(node) - 1] for node in hierarchy.nodes]
        self.register_buffer("edge_weight", torch.tensor(edge_w, dtype=torch.float64), persistent=False)
        self.register_buffer("path", hierarchy.path_matrix(), persistent=False)

    def node_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``log P(n)`` for every node, ``[B, len(nodes)]``."""
        logp = torch.log_softmax(logits, dim=-1)
        return torch.logsumexp(logp.unsqueeze(1) + self.leaf_mask.to(logp.dtype), dim=-1)

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of each sample ``[B]`` (ignored samples get 0)."""
        if logits.dim() != 2 or logits.shape[1] != self.hierarchy.num_leaves:
            raise ValueError(
                f"logits must be [B, {self.hierarchy.num_leaves}] (leaves of {self.hierarchy.name!r}), "
                f"got {tuple(logits.shape)}"
            )
        if target.shape != logits.shape[:1]:
            raise ValueError(f"target must be [B]={tuple(logits.shape[:1])}, got {tuple(target.shape)}")
        _check_targets(self, target, len(self.hierarchy.nodes))
        log_p = self.node_log_probs(logits)
        log_p_ext = torch.cat([log_p, log_p.new_zeros(log_p.shape[0], 1)], dim=1)  # root column = log 1
        # -log(P(n) / P(parent(n))) for every edge, weighted by its level.
        edge = (log_p_ext[:, self.parent_idx] - log_p) * self.edge_weight.to(log_p.dtype)
        on_path = self.path[target.clamp_min(0)].to(log_p.dtype)
        return (edge * on_path).sum(dim=1) * (target >= 0).to(log_p.dtype)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _masked_mean(self.per_sample(logits, target), target >= 0)


class FlatCrossEntropy(nn.Module):
    """Cross-entropy over leaves; samples labelled at internal nodes are ignored and counted.

    ``L = -log softmax(logits)[t]`` for leaf targets ``t < n_leaves`` (leaf indices coincide with
    node indices). Targets at internal nodes carry information flat CE cannot use; they are skipped
    and added to ``ignored_internal`` (``last_ignored_internal`` holds the count of the last batch).
    """

    def __init__(self, hierarchy: Hierarchy):
        super().__init__()
        self.hierarchy = hierarchy
        self.check_targets = True
        self.num_leaves = hierarchy.num_leaves
        self._ignored: torch.Tensor | None = None  # running count, kept on the device until read
        self._last: torch.Tensor | None = None

    @property
    def ignored_internal(self) -> int:
        return 0 if self._ignored is None else int(self._ignored)

    @property
    def last_ignored_internal(self) -> int:
        return 0 if self._last is None else int(self._last)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_leaves:
            raise ValueError(f"logits must be [B, {self.num_leaves}], got {tuple(logits.shape)}")
        _check_targets(self, target, len(self.hierarchy.nodes))
        internal = target >= self.num_leaves
        self._last = internal.sum()
        self._ignored = self._last if self._ignored is None else self._ignored + self._last
        valid = (target >= 0) & ~internal
        safe = torch.where(valid, target, torch.zeros_like(target))
        per = nn.functional.cross_entropy(logits, safe, reduction="none")
        return _masked_mean(per, valid)


def build_supervised_loss(kind: str, hierarchy: Hierarchy, alpha: float | None = None,
                          level_weights: Sequence[float] | None = None, normalize: str = "none") -> nn.Module | None:
    """The supervised loss named by ``loss.supervised.kind`` (``hxe``, ``flat``, ``none``)."""
    if kind == "hxe":
        return HierarchicalCrossEntropy(hierarchy, alpha, level_weights, normalize)
    if kind == "flat":
        return FlatCrossEntropy(hierarchy)
    if kind == "none":
        return None
    raise ValueError(f"loss.supervised.kind must be hxe, flat or none, got {kind!r}")
