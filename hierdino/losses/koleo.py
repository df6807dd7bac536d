"""KoLeo regulariser (Sablayrolles et al., "Spreading vectors for similarity search", ICLR 2019; DINOv2).

Kozachenko-Leonenko differential-entropy estimator on L2-normalised features ``x[B, D]``::

    L = -(1/B) sum_i log( || x_i - x_nn(i) ||_2 + eps ),  nn(i) = argmin_{j != i} || x_i - x_j ||

Minimising it pushes each feature away from its nearest neighbour, spreading the batch. DINOv2
applies it to each global crop's student CLS tokens separately and **sums** the crops' values
(``koleo_weight * (L(crop 1) + L(crop 2))``); ``StudentTeacher`` does the same.

Example::

    loss = koleo_loss(student_cls_global_crop_1) + koleo_loss(student_cls_global_crop_2)
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    if x.shape[0] < 2:
        return x.sum() * 0.0
    z = F.normalize(x.float(), dim=-1, eps=1e-8)
    with torch.no_grad():
        sim = z @ z.t()
        sim.fill_diagonal_(-2.0)  # never pick oneself
        nn_idx = sim.argmax(dim=1)
    dist = (z - z[nn_idx]).norm(dim=-1)
    return -torch.log(dist + eps).mean()
