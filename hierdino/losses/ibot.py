"""iBOT masked-patch loss (Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022).

The student sees global crops with some patches replaced by a mask token; the teacher sees them
whole. For the masked patches p of image b (``M_b`` of them), with teacher targets ``t_p`` and
student patch logits ``s_p``::

    L = mean over images with M_b > 0 of  (1 / M_b) * sum_{p masked in b}  sum_k -t_p[k] log_softmax(s_p / tau_s)[k]

Shapes: ``student_patch_logits[M, K]`` and ``teacher_targets[M, K]`` for the M masked patches of the
batch (in ``masks.nonzero()`` order), ``masks[B, N]`` bool.
"""

from __future__ import annotations

import torch

from hierdino.losses.dino import cross_entropy_soft


def ibot_patch_loss(student_patch_logits: torch.Tensor, teacher_targets: torch.Tensor, masks: torch.Tensor,
                    student_temp: float) -> torch.Tensor:
    per_patch = cross_entropy_soft(student_patch_logits, teacher_targets, student_temp)  # [M]
    per_image_count = masks.sum(dim=1)  # [B]
    image_of_patch = masks.nonzero()[:, 0]
    weights = 1.0 / per_image_count[image_of_patch].clamp_min(1).to(per_patch.dtype)
    n_images = (per_image_count > 0).sum()
    if int(n_images) == 0:
        return student_patch_logits.sum() * 0.0
    return (per_patch * weights).sum() / n_images
