"""ViT backbones from timm with an iBOT mask token, and loading pretrained weights into them.

``build_backbone("vit_small_patch14_dinov2", img_size=224)`` never downloads: weights come only from
``load_pretrained(backbone, "<path or s3:// URI>")``, which reads every DINOv2 / DinoBloom / timm
checkpoint form (``hierdino.models.weights``), converts it exactly, and refuses partial loads.
``python -m hierdino.models.backbone check <weights>`` does the same for a file before a cluster run.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import re
from dataclasses import dataclass

import timm
import torch
from timm.layers import DropPath, SwiGLUPacked
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from torch import nn

from hierdino import logs
from hierdino.archs import TINY_ARCHS
from hierdino.errors import user_errors
from hierdino.models.weights import Checkpoint, WeightsError, parse, read_object, to_timm

logger = logging.getLogger(__name__)


def _register_tiny_archs() -> None:
    """Make the tiny CPU architectures timm model names, so ``timm.create_model`` builds (and loads) them."""
    for name, spec in TINY_ARCHS.items():
        if name in timm.list_models():
            continue
        args = {k: v for k, v in spec.items() if k != "swiglu"} | {"init_values": 1e-5}  # build_backbone's overrides
        if spec.get("swiglu"):
            args |= {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}

        def make(pretrained=False, _name=name, _args=args, **kwargs):
            kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or {"architecture": _name}  # no "no config" warning
            return build_model_with_cfg(VisionTransformer, _name, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                        **dict(_args, **kwargs))

        make.__name__ = name
        make.__module__ = __name__
        register_model(make)


_register_tiny_archs()


SUBSET_DEPTH_ABOVE = 0.1  # drop-path rates above this run each residual branch on a subset of the batch (DINOv2)


def subset_residual(x: torch.Tensor, branch, drop_prob: float) -> torch.Tensor:
    """``x`` plus a residual ``branch`` under stochastic depth, the branch computed on kept samples only.

    A random subset of ``k = max(floor((1 - p) * B), 1)`` of the ``B`` samples runs the branch; its
    output is added to those rows scaled by ``B / k``, and the other rows pass unchanged. Each row's
    expected update is the branch's output, as with per-sample drop path (kept with probability
    1 - p, scaled by 1 / (1 - p)), but dropped rows cost nothing: the branch runs on k rows instead
    of B, (1 - p) of the compute (DINOv2's batch-subset stochastic depth). The subset is drawn on
    the device (``randperm``): no host sync.
    """
    if drop_prob >= 1:  # always dropped, as per-sample drop path at rate 1
        return x
    b = x.shape[0]
    keep = max(int(b * (1 - drop_prob)), 1)
    rows = torch.randperm(b, device=x.device)[:keep]
    out = branch(x.index_select(0, rows))
    return x.index_add(0, rows, out.to(x.dtype), alpha=b / keep)


def _drop_prob(module: nn.Module) -> float:
    return float(getattr(module, "drop_prob", 0.0))


class SubsetDepthBlock(Block):
    """timm's ViT block, except that while training, a residual branch whose drop-path rate is above
    ``SUBSET_DEPTH_ABOVE`` runs on a subset of the batch (``subset_residual``), as DINOv2 does above
    that rate; at lower rates it computes what timm's block does. In eval mode or with timm's own
    arguments (an attention mask: none in these backbones) it is timm's block, whatever timm 1.0.x's
    signature of ``Block.forward``. Same parameters and state-dict keys as ``Block``:
    ``build_backbone`` gives this class to blocks that are plain ``Block``s.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.training or args or any(v is not None and v is not False for v in kwargs.values()):
            return super().forward(x, *args, **kwargs)
        p1, p2 = _drop_prob(self.drop_path1), _drop_prob(self.drop_path2)

        def attn(y):
            return self.ls1(self.attn(self.norm1(y)))

        def mlp(y):
            return self.ls2(self.mlp(self.norm2(y)))

        x = subset_residual(x, attn, p1) if p1 > SUBSET_DEPTH_ABOVE else x + self.drop_path1(attn(x))
        return subset_residual(x, mlp, p2) if p2 > SUBSET_DEPTH_ABOVE else x + self.drop_path2(mlp(x))


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
    """A randomly initialised backbone; ``arch`` is any timm ViT name or one of ``TINY_ARCHS``;
    ``layerscale_init`` None: no LayerScale.

    Stochastic depth: timm raises the drop-path rate linearly from 0 (first block) to
    ``drop_path_rate`` (last); ``drop_path_uniform`` gives every block ``drop_path_rate`` (DINOv2).
    Above a rate of 0.1 a block's branches run on the kept samples only (``SubsetDepthBlock``).
    """
    if arch not in timm.list_models():
        close = difflib.get_close_matches(arch, timm.list_models("vit_*"), n=4)
        raise ValueError(f"model.arch {arch!r} is not a timm model (nor one of {sorted(TINY_ARCHS)}); close: {close}")
    try:
        # init_values 0: no LayerScale (timm drops None arguments, so an arch's own default would stay)
        vit = timm.create_model(arch, pretrained=False, img_size=img_size, num_classes=0, dynamic_img_size=True,
                                drop_path_rate=drop_path_rate, init_values=layerscale_init or 0.0)
    except TypeError as e:  # a timm model of another family: no img_size / init_values arguments
        raise ValueError(f"model.arch {arch!r} is not a timm VisionTransformer ({e}); the backbones are ViTs: vit_*, "
                         f"deit_*, the DINOv2 ones (vit_*_patch14_dinov2) or {sorted(TINY_ARCHS)}") from None
    if not isinstance(vit, timm.models.VisionTransformer):
        raise ValueError(f"model.arch {arch!r} is a {type(vit).__name__}, not a timm VisionTransformer; the backbones "
                         f"are ViTs: vit_*, deit_*, the DINOv2 ones (vit_*_patch14_dinov2) or {sorted(TINY_ARCHS)}")
    if img_size % vit.patch_embed.patch_size[0]:
        raise ValueError(f"data.image_size={img_size} is not a multiple of {arch}'s patch size {vit.patch_embed.patch_size[0]}")
    if drop_path_uniform and drop_path_rate > 0:
        for blk in vit.blocks:
            blk.drop_path1, blk.drop_path2 = DropPath(drop_path_rate), DropPath(drop_path_rate)
    for blk in vit.blocks:
        if type(blk) is Block:  # the same module with DINOv2's batch-subset stochastic depth
            blk.__class__ = SubsetDepthBlock
    return Backbone(vit, arch)


@dataclass
class LoadReport:
    """What ``load_pretrained`` found and did: the checkpoint's form, conversions, and any tensors left over."""

    source: str
    form: str
    loaded: int
    missing: list[str]
    unexpected: list[str]
    notes: list[str]

    @property
    def exact(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        text = f"{self.source}: {self.form} checkpoint, {self.loaded} backbone tensors loaded"
        if self.notes:
            text += "; " + "; ".join(self.notes)
        if self.missing:
            text += f"; NOT IN CHECKPOINT ({len(self.missing)}, left as initialised): {', '.join(self.missing[:12])}"
        if self.unexpected:
            text += f"; UNUSED FROM CHECKPOINT ({len(self.unexpected)}): {', '.join(self.unexpected[:12])}"
        return text


def load_pretrained(backbone: Backbone, source: str | Checkpoint, strict: bool = True, tower: str = "teacher",
                    options=None) -> LoadReport:
    """Load a checkpoint of any form (``hierdino.models.weights``) into ``backbone``.

    ``strict``: a backbone tensor the checkpoint does not provide, or a checkpoint backbone tensor
    this backbone has no place for, raises ``WeightsError`` listing them (``mask_token`` aside: timm
    checkpoints and exports have none, and it starts at zeros as in DINOv2). Shapes must match.
    """
    ckpt = source if isinstance(source, Checkpoint) else parse(read_object(source, options), source, tower)
    own_regs = getattr(backbone.vit, "num_reg_tokens", 0)
    if ckpt.registers != own_regs:
        raise WeightsError(f"{ckpt.source}: the checkpoint has {ckpt.registers} register tokens (reg_token), "
                           f"model.arch={backbone.arch!r} has {own_regs}; pick the arch with the same registers "
                           "(DINOv2's _reg models: timm's vit_*_patch14_reg4_dinov2)")
    sd, notes = to_timm(ckpt, backbone.vit)
    sd = {f"vit.{k}": v for k, v in sd.items()}
    if "mask_token" in ckpt.backbone:
        sd["mask_token"] = ckpt.backbone["mask_token"].reshape(1, -1)
    else:
        notes.append("no mask_token in the checkpoint: zeros")
    own = backbone.state_dict()
    bad = [f"{k}: {tuple(v.shape)} in checkpoint vs {tuple(own[k].shape)} in {backbone.arch}"
           for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise WeightsError(f"{ckpt.source}: shapes do not match {backbone.arch}: {'; '.join(bad[:5])}")
    missing = [k for k in own if k not in sd and k != "mask_token"]
    unexpected = [k for k in sd if k not in own]
    report = LoadReport(ckpt.source, ckpt.form, len(sd) - len(unexpected), missing, unexpected, ckpt.notes + notes)
    if strict and not report.exact:
        if missing and not unexpected and all(re.search(r"\.ls[12]\.gamma$", k) for k in missing):
            raise WeightsError(f"{ckpt.source}: the checkpoint has no LayerScale (ls1/ls2.gamma: a ViT without it, "
                               f"as timm's vit_*_224 models), {backbone.arch!r} here has: set model.layerscale_init=null")
        raise WeightsError(f"{report}. The checkpoint does not fit model.arch={backbone.arch!r}: pick the matching "
                           "arch, or set model.init_strict=false to go on with these tensors as they are")
    backbone.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return report


@user_errors(OSError)  # WeightsError and StorageError are UserErrors; also a missing local file or a directory
def check(argv: list[str] | None = None) -> int:
    """``python -m hierdino.models.backbone check <weights> [--arch A] [--img-size S] [--tower T]``."""
    ap = argparse.ArgumentParser(prog="python -m hierdino.models.backbone check",
                                 description="Load a checkpoint as a training run would, report it, print a feature norm.")
    ap.add_argument("command", choices=["check"])
    ap.add_argument("weights", help="local path or s3:// URI")
    ap.add_argument("--arch", default=None, help="timm ViT name (default: guessed from the checkpoint's width and depth)")
    ap.add_argument("--img-size", type=int, default=None, help="input size (default: the checkpoint's grid)")
    ap.add_argument("--tower", default="teacher", choices=["teacher", "student"])
    logs.add_flags(ap)
    args = ap.parse_args(argv)
    logs.console(logs.level_from_flags(args.quiet, args.verbose))
    ckpt = parse(read_object(args.weights), args.weights, args.tower)
    arch = args.arch or guess_arch(ckpt)
    img = args.img_size or _native_size(ckpt, arch)
    bb = build_backbone(arch, img)
    try:
        report = load_pretrained(bb, ckpt, strict=True)
        status = 0
    except WeightsError as e:
        logger.warning(str(e))
        report, status = load_pretrained(bb, ckpt, strict=False), 1
    logger.info(f"arch {arch} at {img} px: {report}")
    if ckpt.heads:
        logger.info("heads: " + ", ".join(f"{h} ({len(t)} tensors, {head_prototypes(t)} prototypes)"
                                          for h, t in ckpt.heads.items()))
    else:
        logger.info("heads: none (random DINO/iBOT heads; consider train.freeze_backbone_steps)")
    x = torch.linspace(-1, 1, 3 * img * img).reshape(1, 3, img, img)  # a fixed input, the same on every machine
    with torch.no_grad():
        cls, patches = bb.eval()(x)
    logger.info(f"fixed-input feature norms: CLS {cls.norm():.4f}, mean patch {patches.norm(dim=-1).mean():.4f}")
    return status


def head_prototypes(head: dict[str, torch.Tensor]) -> int | None:
    for k in ("last_layer.weight", "last_layer.weight_v", "last_layer.parametrizations.weight.original1"):
        if k in head:
            return int(head[k].shape[0])
    return None


def guess_arch(ckpt: Checkpoint) -> str:
    """The timm DINOv2 arch of a checkpoint from its width, depth and registers (for ``check``)."""
    dim = int(ckpt.backbone["cls_token"].shape[-1]) if "cls_token" in ckpt.backbone else None
    blocks = {int(k.split(".")[1]) for k in ckpt.backbone if k.startswith("blocks.")}
    swiglu = any(".mlp.w12." in k for k in ckpt.backbone)
    for name, spec in TINY_ARCHS.items():
        if (spec["embed_dim"], spec["depth"], bool(spec.get("reg_tokens")), bool(spec.get("swiglu"))) == \
                (dim, len(blocks), ckpt.registers > 0, swiglu):
            return name
    size = {384: "small", 768: "base", 1024: "large", 1536: "giant"}.get(dim)
    if size is None:
        raise WeightsError(f"{ckpt.source}: cannot guess the arch of a width-{dim} model; pass --arch")
    return f"vit_{size}_patch14_{'reg4_' if ckpt.registers else ''}dinov2"


def _native_size(ckpt: Checkpoint, arch: str) -> int:
    pos = ckpt.backbone.get("pos_embed")
    patch = TINY_ARCHS[arch]["patch_size"] if arch in TINY_ARCHS else 14
    if pos is None:
        return 224
    n = pos.shape[1] - (0 if "reg_token" in ckpt.backbone else 1)  # timm's register models: no CLS position
    return math.isqrt(n) * patch


if __name__ == "__main__":
    import sys

    sys.exit(check())
