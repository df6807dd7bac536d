"""DINO self-distillation loss and the teacher's centering (EMA centre or Sinkhorn-Knopp).

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (ICCV 2021); Oquab et
al., "DINOv2" (TMLR 2024). Teacher targets ``t_i`` (probabilities, one per global crop) and student
logits ``s_j`` (every crop) give::

    L = mean over pairs (i, j), i != j, of  mean_b  sum_k  -t_i[b, k] * log_softmax(s_j[b] / tau_s)[k]

where the pairs are global-global (i != j) and, when local crops are given, global-local.

Scale, kept on purpose: the MEAN over the pairs, ``2 (n_crops - 1)`` of them for 2 global crops and
``n_crops`` student crops. DINOv2 (``dinov2/train/ssl_meta_arch.py``) divides the SUM of the same
cross-entropies by ``n_global_terms + max(n_local * n_global, 1)`` = ``2 + max(2 n_local, 1)``. With
local crops that is the number of pairs and the two agree; with none (every preset) it is 3 for 2
pairs, so this loss is 1.5x DINOv2's there. The presets were tuned on the mean, whose scale does not
depend on a denominator term for crops that do not exist. To reproduce DINOv2 without local crops,
multiply ``loss.dino_weight`` by 2/3 (DINOv2's 1.0 is 0.667 here). ``tests/test_ssl_losses.py`` pins it.

Example::

    center = TeacherCentering(65536, "sinkhorn")
    targets = center.targets(teacher_logits_per_crop, teacher_temp=0.07)
    loss = dino_loss(student_logits_per_crop, targets, student_temp=0.1)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    if _dist():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float | torch.Tensor, iterations: int = 3,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher targets ``[B, K]`` whose prototype marginals are uniform over the global batch.

    With ``Q = exp(logits / T)`` (``[B, K]``), the targets are ``P = B * diag(v) Q diag(u)``, where
    ``iterations`` rounds of
        u <- (1/K) / (v^T Q)        (each prototype's mass over the global batch becomes 1/K)
        v <- (1/B) / (Q u)          (each sample's mass becomes 1/B)
    start from ``v = 1``; the final factor B makes each sample's row sum to 1. This is the usual
    alternate row/column normalisation of ``Q``, carried as the two scaling vectors: each round
    reads ``Q`` twice (two matrix-vector products) instead of rewriting it, which is what costs on
    a GPU with 65,536 prototypes and thousands of masked patches. Prototype sums, the maximum
    logit and the sample count are all-reduced across ranks.

    ``valid[B]`` (bool) marks the real rows of a fixed-size buffer (padded masked patches): the
    others take no part (``Q`` and ``v`` are 0 there, ``B`` counts the real rows) and get all-zero
    targets, so the real rows' targets are those of the real rows alone.
    """
    if iterations < 1:
        raise ValueError(f"sinkhorn_knopp: iterations must be >= 1, got {iterations}")
    logits = teacher_logits.float()
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None], float("-inf"))  # out of the maximum
    local_max = logits.max() if logits.numel() else logits.new_full((), float("-inf"))  # empty: no masked patch here
    gmax = _all_reduce(local_max.clone(), dist.ReduceOp.MAX if _dist() else None)
    q = logits.sub(gmax).div_(teacher_temp).exp_().clamp_min_(1e-30)  # [B, K]; the floor keeps far-off prototypes finite
    b, k = q.shape
    if valid is None:
        b_global = _all_reduce(q.new_full((), float(b)))  # a fill on the device: no host copy
    else:
        q = torch.where(valid[:, None], q, 0.0)
        b_global = _all_reduce(valid.sum().float())
    v = q.new_ones(b)
    for _ in range(iterations):
        u = _all_reduce(v @ q).mul_(k).reciprocal_()
        if valid is not None:  # no real row anywhere: 0, not 1/0
            u = torch.where(torch.isinf(u), 0.0, u)
        v = (q @ u).mul_(b_global).reciprocal_()
        if valid is not None:  # padding rows: Q u = 0 there
            v = torch.where(valid, v, 0.0)
    return q.mul_(u).mul_((v * b_global)[:, None])


class TeacherCentering(nn.Module):
    """Turns teacher logits into targets: ``softmax((t - c) / T)`` with an EMA centre ``c``, or Sinkhorn-Knopp.

    With ``mode="ema"``, ``update(teacher_logits)`` moves ``c`` towards the batch mean (all-reduced),
    ``c <- m * c + (1 - m) * mean(t)``; call it after computing the targets of the step.

    ``valid[B]`` (bool, both methods): the real rows of a fixed-size buffer; the mean is over them
    alone, and the other rows get finite targets that the loss weighs 0.
    """

    def __init__(self, dim: int, mode: str = "ema", momentum: float = 0.9, sinkhorn_iterations: int = 3):
        super().__init__()
        if mode not in ("ema", "sinkhorn"):
            raise ValueError(f"centering must be 'ema' or 'sinkhorn', got {mode!r}")
        if not 0 <= momentum <= 1:
            raise ValueError(f"center momentum must be in [0, 1], got {momentum}")
        self.mode, self.momentum, self.iterations = mode, momentum, sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def targets(self, teacher_logits: torch.Tensor, teacher_temp: float | torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "sinkhorn":
            return sinkhorn_knopp(teacher_logits, teacher_temp, self.iterations, valid)
        return torch.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        if self.mode != "ema":
            return
        logits = teacher_logits.float()
        if valid is None:
            count = _all_reduce(teacher_logits.new_full((), float(teacher_logits.shape[0])))  # a fill: no host copy
        else:
            logits, count = torch.where(valid[:, None], logits, 0.0), _all_reduce(valid.sum().float())
        total = _all_reduce(logits.sum(dim=0, keepdim=True))
        moved = self.center * self.momentum + total / count.clamp_min(1.0) * (1 - self.momentum)
        # No host read (no stall on GPUs); a batch with non-finite logits (a step that will be
        # skipped) leaves the centre as it was.
        self.center.copy_(torch.where((count > 0) & torch.isfinite(moved).all(), moved, self.center))


def cross_entropy_soft(student_logits: torch.Tensor, targets: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-row ``sum_k -targets[k] * log_softmax(student / tau)[k]``."""
    return -(targets * torch.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)


def dino_loss(student_logits: list[torch.Tensor], teacher_targets: list[torch.Tensor], student_temp: float) -> torch.Tensor:
    """Mean DINO cross-entropy over pairs (teacher global crop i, student crop j), ``j != i``: not
    DINOv2's sum / 3 without local crops (the module docstring says why and how to convert).

    ``student_logits``: global crops first (same order as ``teacher_targets``), then local crops.
    """
    if len(student_logits) < 2 and len(teacher_targets) < 2:
        raise ValueError("DINO needs at least two crops")
    terms = []
    for i, t in enumerate(teacher_targets):
        for j, s in enumerate(student_logits):
            if i != j:
                terms.append(cross_entropy_soft(s, t, student_temp).mean())
    return torch.stack(terms).mean()
