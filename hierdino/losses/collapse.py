"""Collapse statistics of a self-distillation step, and the watch that turns them into a warning.

DINO-style training fails in two ways (Caron et al. 2021, section 5.3): the teacher's targets become
**uniform** (every image gets the same flat distribution, the loss sits at ``ln K``), or they
concentrate on **one prototype** (every image gets the same one-hot target). Four numbers tell them
apart, computed on one batch:

- ``entropy_ratio(t) = mean_b H(t_b) / ln K`` with ``H(p) = -sum_k p_k ln p_k``: 1 for uniform
  targets, 0 for one-hot ones;
- ``distinct_argmax(t)``: how many prototypes are the argmax of some target (1 = one-prototype
  collapse; at most ``min(B, K)``);
- ``feature_spread(x) = sqrt(D) * mean_d std_b(z[b, d])`` with ``z = x / ||x||``: about 1 for
  features spread over the sphere (a random unit vector has per-dimension std ``1/sqrt(D)``),
  0 when every image has the same feature;
- the labelled fraction of the batch (computed by the caller).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


@torch.no_grad()
def entropy_ratio(targets: torch.Tensor) -> float:
    """Mean entropy of the rows of ``targets[B, K]`` (probabilities) divided by ``ln K``; NaN for no rows."""
    if targets.shape[0] == 0:
        return float("nan")
    p = targets.float()
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)
    return float(h.mean() / math.log(p.shape[-1]))


@torch.no_grad()
def distinct_argmax(targets: torch.Tensor) -> int:
    """Number of distinct prototypes that are the argmax of some row of ``targets[B, K]``."""
    if targets.shape[0] == 0:
        return 0
    return int(torch.unique(targets.argmax(dim=-1)).numel())


@torch.no_grad()
def feature_spread(x: torch.Tensor) -> float:
    """``sqrt(D) * mean over dimensions of the std over the batch`` of the L2-normalised ``x[B, D]``."""
    if x.shape[0] < 2:
        return float("nan")
    z = F.normalize(x.float(), dim=-1)
    return float(z.std(dim=0, unbiased=False).mean() * math.sqrt(z.shape[-1]))


class CollapseWatch:
    """Warns once (and optionally stops) when the DINO targets stay near uniform after warm-up.

    ``observe(step, ratio)`` is called at each logged step with the DINO target entropy ratio.
    After ``warmup_steps``, ``patience`` consecutive observations above ``threshold`` count as a
    collapse: ``observe`` returns the warning text once (the caller prints it), or raises
    ``TrainingCollapsedError`` when ``stop`` is set.
    """

    def __init__(self, warmup_steps: int, threshold: float = 0.98, patience: int = 3, stop: bool = False):
        self.warmup_steps, self.threshold, self.patience, self.stop = warmup_steps, threshold, patience, stop
        self.streak = 0
        self.warned_at: int | None = None

    def observe(self, step: int, ratio: float) -> str | None:
        """The warning text when this observation completes a collapse, else None."""
        if step <= self.warmup_steps or not math.isfinite(ratio):
            return None
        self.streak = self.streak + 1 if ratio > self.threshold else 0
        if self.streak < self.patience:
            return None
        msg = (f"training looks collapsed at step {step}: the DINO teacher targets have stayed near uniform "
               f"(entropy / ln K = {ratio:.3f} > {self.threshold} for {self.streak} logged steps); the loss will "
               "sit at ln K and the backbone learns little. Try a larger model.layerscale_init, "
               "loss.koleo_weight=0.1, a lower loss.teacher_temp or loss.centering=ema (see the tiny-cpu preset)")
        if self.stop:
            raise TrainingCollapsedError(msg + " [train.stop_on_collapse=true]")
        if self.warned_at is None:
            self.warned_at = step
            return msg
        return None


class TrainingCollapsedError(RuntimeError):
    """Raised with ``train.stop_on_collapse`` when the teacher targets stay uniform after warm-up."""
