"""ViT backbones from timm, with an iBOT mask token, and loading of DINOv2 / DinoBloom / timm weights.

``build_backbone("vit_small_patch14_dinov2", img_size=224)`` never downloads: weights come only
from ``load_pretrained(backbone, "<path or s3:// URI>")``, which reads DINOv2 hub-format, DinoBloom
(DINOv2 format under a ``teacher`` key, ``backbone.`` prefix) or timm-format checkpoints through
``torch.load(weights_only=True)`` or safetensors, interpolates position embeddings with timm's
filter, and reports missing/unexpected keys.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import timm
import torch
from torch import nn

TINY_ARCHS = {
    # name: (patch, embed dim, depth, heads) - small enough for 2-CPU laptops and CI
    "vit_tiny_cpu": (8, 96, 4, 3),
    "vit_micro_cpu": (8, 48, 2, 2),
}


def _register_tiny_archs() -> None:
    """Make the tiny CPU architectures timm model names, so ``timm.create_model`` builds (and loads) them."""
    from timm.models import build_model_with_cfg, register_model
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    for name, (patch, dim, depth, heads) in TINY_ARCHS.items():
        if name in timm.list_models():
            continue

        def make(pretrained=False, _name=name, _args=dict(patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                                                           init_values=1e-5), **kwargs):
            return build_model_with_cfg(VisionTransformer, _name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                        **dict(_args, **kwargs))

        make.__name__ = name
        make.__module__ = __name__
        register_model(make)


_register_tiny_archs()


class Backbone(nn.Module):
    """A timm ViT returning the CLS token and the patch tokens, with optional iBOT masking.

    ``forward(x[B, 3, H, W], masks[B, N] | None) -> (cls[B, D], patches[B, N, D])``: masked patch
    embeddings are replaced by a learned ``mask_token`` before position embeddings are added.
    Works at any input size that is a multiple of the patch (position embeddings interpolated).
    """

    def __init__(self, vit: nn.Module, arch: str):
        super().__init__()
        self.vit = vit
        self.arch = arch
        self.embed_dim = vit.embed_dim
        self.patch_size = vit.patch_embed.patch_size[0]
        self.img_size = vit.patch_embed.img_size[0]
        self.mask_token = nn.Parameter(torch.zeros(1, vit.embed_dim))
        self.num_prefix = vit.num_prefix_tokens

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.vit
        t = v.patch_embed(x)  # [B, h, w, D] with dynamic_img_size
        if masks is not None:
            b, h, w, d = t.shape
            m = masks.view(b, h, w, 1)
            t = torch.where(m, self.mask_token.to(t.dtype).view(1, 1, 1, d), t)
        t = v._pos_embed(t)
        t = v.patch_drop(t)
        t = v.norm_pre(t)
        for blk in v.blocks:
            t = blk(t)
        t = v.norm(t)
        return t[:, 0], t[:, self.num_prefix:]

    def layer_id(self, param_name: str) -> int:
        """Depth of a parameter for layer-wise LR decay: embeddings 0, block i -> i + 1, final norm depth + 1."""
        n = param_name.removeprefix("vit.")
        if n.startswith(("cls_token", "pos_embed", "reg_token", "patch_embed", "mask_token")) or param_name == "mask_token":
            return 0
        if n.startswith("blocks."):
            return int(n.split(".")[1]) + 1
        return len(self.vit.blocks) + 1


def build_backbone(arch: str, img_size: int, drop_path_rate: float = 0.0, layerscale_init: float | None = 1e-5,
                   drop_path_uniform: bool = False) -> Backbone:
    """A randomly initialised backbone; ``arch`` is any timm ViT name or one of ``TINY_ARCHS``.

    Stochastic depth: timm raises the drop-path rate linearly from 0 (first block) to
    ``drop_path_rate`` (last); ``drop_path_uniform`` gives every block ``drop_path_rate`` (DINOv2).
    """
    if arch not in timm.list_models():
        import difflib

        close = difflib.get_close_matches(arch, timm.list_models("vit_*"), n=4)
        raise ValueError(f"model.arch {arch!r} is not a timm model (nor one of {sorted(TINY_ARCHS)}); close: {close}")
    vit = timm.create_model(arch, pretrained=False, img_size=img_size, num_classes=0, dynamic_img_size=True,
                            drop_path_rate=drop_path_rate, init_values=layerscale_init)
    if img_size % vit.patch_embed.patch_size[0]:
        raise ValueError(f"data.image_size={img_size} is not a multiple of {arch}'s patch size {vit.patch_embed.patch_size[0]}")
    if drop_path_uniform and drop_path_rate > 0:
        from timm.layers import DropPath

        for blk in vit.blocks:
            blk.drop_path1, blk.drop_path2 = DropPath(drop_path_rate), DropPath(drop_path_rate)
    return Backbone(vit, arch)


@dataclass
class LoadReport:
    source: str
    missing: list[str]
    unexpected: list[str]
    loaded: int

    def __str__(self) -> str:
        return (f"loaded {self.loaded} tensors from {self.source}; missing {len(self.missing)}: {self.missing[:8]}; "
                f"unexpected {len(self.unexpected)}: {self.unexpected[:8]}")


def read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """A state dict from a local path or s3:// URI (``.safetensors`` or a ``torch.load``-able file, weights only)."""
    from hierdino.data import storage

    data = storage.read_bytes(uri)
    if uri.endswith(".safetensors"):
        from safetensors.torch import load

        return load(data)
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for key in ("teacher", "model", "state_dict", "student"):  # DinoBloom / DINOv2 training checkpoints
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{uri}: expected a state dict, got {type(obj).__name__}")
    return obj


def convert_state_dict(sd: dict[str, torch.Tensor], backbone: Backbone) -> dict[str, torch.Tensor]:
    """DINOv2 / DinoBloom / timm keys -> this backbone's keys, position embeddings resampled."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "teacher.", "student.", "backbone.", "vit."):
            k = k.removeprefix(prefix)
        if k.startswith(("dino_head", "ibot_head", "head.")):
            continue
        out[k] = v
    mask_token = out.pop("mask_token", None)
    converted = checkpoint_filter_fn(out, backbone.vit)
    result = {f"vit.{k}": v for k, v in converted.items()}
    if mask_token is not None:
        result["mask_token"] = mask_token.reshape(1, -1)
    return result


def load_pretrained(backbone: Backbone, uri: str) -> LoadReport:
    sd = convert_state_dict(read_state_dict(uri), backbone)
    own = backbone.state_dict()
    shape_bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if shape_bad:
        raise ValueError(f"{uri}: shapes do not match {backbone.arch} for {shape_bad[:5]} "
                         f"(e.g. {shape_bad[0]}: {tuple(sd[shape_bad[0]].shape)} vs {tuple(own[shape_bad[0]].shape)})")
    result = backbone.load_state_dict(sd, strict=False)
    return LoadReport(uri, list(result.missing_keys), list(result.unexpected_keys), len(sd) - len(result.unexpected_keys))
