"""Projection heads: DINO / iBOT heads (MLP -> bottleneck -> L2-normalised prototypes) and the supervised head."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class DINOHead(nn.Module):
    """MLP (``layers`` linear layers, GELU between) to a ``bottleneck``, L2 normalisation, then a
    weight-normalised prototype layer, as DINOv2's: ``logits_k = g_k * <z, v_k / |v_k|>``, the
    directions ``v`` (``last_layer.weight``, [K, bottleneck]) and one trained gain per prototype
    ``g`` (``last_layer.weight_g``, [K, 1], starting at 1; DINOv2's names and shapes, so a DinoBloom
    head loads as it was trained). ``forward(x[..., in_dim]) -> logits[..., prototypes]``.

    The prototype layer is ``last_layer`` (directions and gains); DINOv2 freezes it for the first
    epoch, and weight-decays both.

    ``batchnorm`` puts a BatchNorm after each hidden linear layer (DINO's ``use_bn_in_head``). It
    standardises every hidden feature over the batch, so the bottleneck carries the differences
    between images at unit scale even when the backbone's CLS tokens are still nearly alike (a
    from-scratch ViT at initialisation): the teacher's targets then depend on the image from the
    first step. Each rank normalises over its own crops. ``forward(x, valid)`` with ``valid[rows]``
    (bool, the real rows of a fixed-size buffer of masked patches) takes the batch statistics over
    the real rows alone (``MaskedBatchNorm1d``), so padding rows change no real row's logits.
    """

    def __init__(self, in_dim: int, prototypes: int, hidden: int = 2048, bottleneck: int = 256, layers: int = 3,
                 batchnorm: bool = False):
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                if batchnorm:
                    mods.append(MaskedBatchNorm1d(dims[i + 1]))
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)
        self.last_layer = nn.Linear(bottleneck, prototypes, bias=False)
        self.last_layer.weight_g = nn.Parameter(torch.ones(prototypes, 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.last_layer.weight, std=0.02)
        nn.init.ones_(self.last_layer.weight_g)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if valid is None:
            x = self.mlp(x)
        else:
            for m in self.mlp:
                x = m(x, valid) if isinstance(m, MaskedBatchNorm1d) else m(x)
        z = F.normalize(x, dim=-1, eps=1e-6)
        w = self.last_layer.weight
        # gain over row norm on [K, 1] first: one pass over the [K, bottleneck] directions, not a normalise then a scale
        return F.linear(z, w * (self.last_layer.weight_g / w.norm(dim=1, keepdim=True).clamp_min(1e-6)))


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` (same parameters, buffers and state-dict keys) whose ``forward(x, valid)`` is
    ``bn(x[valid])`` on the real rows, computed for every row of ``x[rows, C]`` (fixed shapes): in
    training the statistics are those of the real rows, ``mu = sum_v x_v / n`` and the biased
    ``var = sum_v (x_v - mu)^2 / n`` (``n = sum(valid)``), and the running statistics move as
    BatchNorm's own, by ``momentum`` towards ``mu`` and the unbiased ``var * n / (n - 1)`` (not at all
    when ``n < 2``); in evaluation, or with ``valid`` None, BatchNorm itself. A module call, so FSDP2's
    hooks (its own fp32 unit) run as for BatchNorm."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        if valid is None or not (self.training or self.running_mean is None):
            return super().forward(x)
        w = valid.to(torch.float32)[:, None]
        xf = x.float()
        n = w.sum()
        mean = (xf * w).sum(0) / n.clamp_min(1.0)
        var = ((xf - mean) ** 2 * w).sum(0) / n.clamp_min(1.0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():  # through .data, as BatchNorm's own kernel: no version bump of buffers that an
                # earlier call of the same module (a head shared by DINO and iBOT) saved for its backward
                m, keep = self.momentum, n >= 2
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.data.copy_(torch.where(keep, self.running_mean * (1 - m) + mean * m, self.running_mean))
                self.running_var.data.copy_(torch.where(keep, self.running_var * (1 - m) + unbiased * m, self.running_var))
                self.num_batches_tracked.add_(1)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


class SupervisedHead(nn.Module):
    """A linear classifier over the hierarchy's leaves on the student CLS token."""

    def __init__(self, in_dim: int, num_leaves: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, num_leaves)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.linear(cls)
