"""iBOT masked-patch loss (Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022),
normalised as DINOv2 does.

The student sees global crops with some patches replaced by a mask token; the teacher sees them
whole. For global crop c with ``M_c`` masked patches, teacher targets ``t_p`` and student patch
logits ``s_p``::

    L = (1 / C) * sum_{c : M_c > 0}  (1 / M_c) * sum_{p masked in c}  sum_k -t_p[k] log_softmax(s_p / tau_s)[k]

where ``C`` is the number of **all** global crops in the batch (masked or not): each masked crop
contributes its mean over masked patches, and crops without a mask count as zeros. With DINOv2's
``mask_sample_prob = 0.5`` about half the crops are masked, so ``L`` is about half the mean per-crop
cross-entropy; that is the scale the published iBOT weight (1.0) refers to.

Shapes: ``student_patch_logits[M, K]`` and ``teacher_targets[M, K]`` for the M masked patches of the
batch (in ``masks.nonzero()`` order), ``masks[C, N]`` bool; ``crop_of_patch[M]`` (the crop of each
masked patch) may be given to avoid ``nonzero`` on the device (a host sync on GPUs).

Fixed shapes (the training step): the rows are a buffer of a size set by the config
(``hierdino.data.masking.padded_mask_index``) and ``weight[M]`` is 1 for a masked patch, 0 for
padding; each row's term is multiplied by its weight, so with real rows first and padding after::

    L = (1 / C) * sum_p  weight_p * CE_p / M_{crop(p)}

is the same sum over the masked patches alone. Padding rows must have finite logits and targets.
"""

from __future__ import annotations

import torch

from hierdino.losses.dino import cross_entropy_soft


def ibot_patch_loss(student_patch_logits: torch.Tensor, teacher_targets: torch.Tensor, masks: torch.Tensor,
                    student_temp: float, crop_of_patch: torch.Tensor | None = None,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    per_patch = cross_entropy_soft(student_patch_logits, teacher_targets, student_temp)  # [M]
    per_crop_count = masks.sum(dim=1)  # [C]
    if crop_of_patch is None:
        crop_of_patch = masks.nonzero()[:, 0]
    weights = 1.0 / per_crop_count[crop_of_patch].clamp_min(1).to(per_patch.dtype)
    if weight is not None:  # a fixed-size buffer: padding rows weigh 0
        weights = weights * weight.to(per_patch.dtype)
    # An empty selection sums to a zero that keeps the graph: no host sync, no special case.
    return (per_patch * weights).sum() / max(masks.shape[0], 1)
