"""Parallelism applied *to* plain models: FSDP2 per transformer block then per root, mixed precision."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def use_tensor_cores(device: torch.device) -> None:
    """On CUDA, let fp32 matmuls and convolutions (the heads, the losses' projections) use TF32
    tensor cores, as DINOv2's trainer does; bf16 work is unaffected. No effect on the CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def param_dtype_for(precision: str, device: torch.device) -> torch.dtype:
    """bf16 parameters on GPU (``auto`` or ``bf16``), fp32 on CPU or with ``fp32``."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "fp32" or device.type != "cuda":
        return torch.float32
    return torch.bfloat16


def apply_fsdp(model, mesh, param_dtype: torch.dtype = torch.float32, reduce_dtype: torch.dtype = torch.float32) -> None:
    """``fully_shard`` every transformer block, then each root (backbone, heads), for student and teacher alike.

    The student and teacher are sharded identically, so their local shards line up for the EMA.
    On one rank resharding saves no memory: the student then keeps its gathered (``param_dtype``)
    parameters from its first forward of a step (global, local and supervised crops) to the end of
    its backward, instead of gathering them again for every forward and backward.
    """
    from torch.distributed.fsdp import (  # heavy (about 1 s): only sharding needs FSDP
        MixedPrecisionPolicy,
        fully_shard,
    )

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # BatchNorm (heads with ``batchnorm``) and the supervised head compute in fp32 whatever
    # ``param_dtype``: bf16 BatchNorm weights against its fp32 running statistics fail, and the
    # supervised logits feed their loss in fp32 as on one worker. Inputs are cast up, and BatchNorm's
    # output back down for the bf16 layer after it.
    fp32 = dict(param_dtype=torch.float32, reduce_dtype=reduce_dtype, cast_forward_inputs=True)
    one_rank = mesh.size() == 1
    for tower in (model.student, model.teacher):
        # The teacher only runs forward: its roots must reshard too, or their parameters stay
        # unsharded after the forward and no longer line up with the student's shards. (The
        # student's parameters are resharded after its backward whatever this setting.)
        teacher = tower is model.teacher
        block_reshard = teacher or not one_rank
        root_reshard = True if teacher else (False if one_rank else None)  # None: FSDP2's default for roots
        for block in tower["backbone"].blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=block_reshard)
        for norm in (m for m in tower.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            fully_shard(norm, mesh=mesh, mp_policy=MixedPrecisionPolicy(output_dtype=param_dtype, **fp32),
                        reshard_after_forward=root_reshard)
        for root in tower.values():  # backbone (embeddings, final norm) and each head
            fully_shard(root, mesh=mesh, mp_policy=mp, reshard_after_forward=root_reshard)
    if model.sup_head is not None:
        fully_shard(model.sup_head, mesh=mesh, mp_policy=MixedPrecisionPolicy(**fp32))


def local_param_fraction(module: nn.Module) -> float:
    """Fraction of the module's parameters held by this rank (1.0 unsharded, ~1/world under FSDP)."""
    local = total = 0
    for p in module.parameters():
        total += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local / max(total, 1)


def param_checksum(module: nn.Module) -> float:
    """Sum of all parameters (float64), all-reduced over shards: equal across runs iff the weights are (almost surely).

    Summed and all-reduced on the parameters' device: NCCL, the GPU backend, has no CPU tensors.
    """
    params = list(module.parameters())
    sharded = any(hasattr(p, "to_local") for p in params)
    total = torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)
    for p in params:
        x = (p.to_local() if hasattr(p, "to_local") else p).detach().double()
        total += x.sum() + (x ** 2).sum() * 1e-3
    if dist.is_initialized() and sharded:
        dist.all_reduce(total)
    return float(total)
