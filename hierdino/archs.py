"""The ViTs this project defines beside timm's, by name, and the patch size of any arch name (kept
free of torch and timm, below the config layer: the config validation reads the patch sizes;
``models/backbone.py`` registers these archs with timm)."""

from __future__ import annotations

import re

TINY_ARCHS = {
    # name: timm VisionTransformer arguments - small enough for 2-CPU laptops and CI. The _reg4 and
    # _swiglu variants have the layouts of DINOv2's register models and of its ViT-g FFN.
    "vit_tiny_cpu": dict(patch_size=8, embed_dim=96, depth=4, num_heads=3),
    "vit_micro_cpu": dict(patch_size=8, embed_dim=48, depth=2, num_heads=2),
    "vit_micro_cpu_reg4": dict(patch_size=8, embed_dim=48, depth=2, num_heads=2, reg_tokens=4, no_embed_class=True),
    "vit_micro_cpu_swiglu": dict(patch_size=8, embed_dim=48, depth=2, num_heads=2, swiglu=True, mlp_ratio=2.66667 * 2),
}


def patch_size(arch: str) -> int | None:
    """The patch size of ``arch``: this project's ViTs from the table above, timm's from their name
    (``..._patch14_...``); None when the name does not say."""
    if arch in TINY_ARCHS:
        return TINY_ARCHS[arch]["patch_size"]
    m = re.search(r"patch(\d+)", arch)
    return int(m.group(1)) if m else None
