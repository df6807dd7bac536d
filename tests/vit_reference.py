"""An independent forward of one pre-norm ViT block with LayerScale (DINOv2's and timm's layout),
written from the formulas for the tests that check our backbones against it."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def block(t: torch.Tensor, sd: dict, p: str, heads: int) -> torch.Tensor:
    """``t[B, N, D]`` through the block whose tensors are ``sd[p + ...]``: attention and MLP (GELU
    ``fc1/fc2`` or SwiGLU ``w12/w3``), each after a LayerNorm and scaled by its LayerScale gamma."""
    b, n, dim = t.shape
    y = F.layer_norm(t, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
    q, k, v = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // heads), -1) @ v
    t = t + sd[p + "ls1.gamma"] * F.linear(a.transpose(1, 2).reshape(b, n, dim), sd[p + "attn.proj.weight"],
                                           sd[p + "attn.proj.bias"])
    y = F.layer_norm(t, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
    if p + "mlp.w12.weight" in sd:
        x1, x2 = F.linear(y, sd[p + "mlp.w12.weight"], sd[p + "mlp.w12.bias"]).chunk(2, -1)
        y = F.linear(F.silu(x1) * x2, sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"])
    else:
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"],
                     sd[p + "mlp.fc2.bias"])
    return t + sd[p + "ls2.gamma"] * y
