"""Pretrained weights in: recognise a checkpoint's form and turn it into this project's key layout.

Forms recognised (``parse``), by their keys, never by file name:

- ``dinov2-hub``: what ``torch.hub.load("facebookresearch/dinov2", ...)`` models hold (``cls_token``,
  ``pos_embed`` over a 37 x 37 grid + CLS, ``mask_token``, ``blocks.<i>.``; ``register_tokens`` for the
  ``_reg`` models; ``mlp.w12`` / ``mlp.w3`` for the SwiGLU FFN of ViT-g). No heads.
- ``dinov2-train``: a DINOv2 / DinoBloom training checkpoint: ``{"teacher": {"backbone.…",
  "dino_head.…", "ibot_head.…"}}`` (``teacher_checkpoint.pth``) or ``{"model": {"teacher.backbone.…",
  "student.backbone.…", …}}`` (``model_<iter>.rank_0.pth``). Blocks may be stored in chunks
  (``blocks.<chunk>.<i>.``, DINOv2's ``block_chunks``; ``<i>`` is the global block index because
  each chunk is padded with identities), keys may carry FSDP / activation-checkpoint / compile
  wrappers (``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``, ``_orig_mod.``, ``module.``).
- ``timm``: a timm ViT state dict (``.pth`` or ``.safetensors``), also this project's exports
  (``export/teacher_backbone.safetensors``).

Position embeddings are resized to the model's grid as the source model resizes them at run time,
so the loaded backbone computes the source model's features: DINOv2 (``interpolate_pos_encoding``)
takes the patch grid ``M x M`` to ``g x g`` with bicubic interpolation at scale factor
``(g + offset) / M`` (offset 0.1, no antialias; the register models: the target size, offset 0,
antialias), timm with its own ``resample_abs_pos_embed``.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field

import safetensors.torch
import torch
from torch.nn import functional as F

from hierdino import storage
from hierdino.errors import UserError

WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.")
HEADS = ("dino_head", "ibot_head")
CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")


class WeightsError(UserError, ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the keys."""

    kind = "weights"


@dataclass
class Checkpoint:
    """A parsed checkpoint: the backbone tensors in DINOv2 / timm naming, the heads found, and how it was read."""

    source: str
    form: str                                   # dinov2-hub | dinov2-train | timm
    backbone: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def registers(self) -> int:
        t = self.backbone.get("register_tokens", self.backbone.get("reg_token"))  # DINOv2 / timm name
        return 0 if t is None else int(t.shape[1])


def _is_safetensors(data: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header starting with ``{``."""
    return len(data) > 8 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= len(data) - 8


def read_object(uri: str, options: storage.StorageOptions | None = None):
    """The object stored at a local path or s3:// URI: safetensors, or ``torch.load`` with weights only
    (the format told by the bytes, not the file name)."""
    data = storage.read_bytes(uri, options)
    if not data:
        raise WeightsError(f"{uri}: the file is empty")
    try:
        if _is_safetensors(data):
            return safetensors.torch.load(data)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        text = " ".join(str(e).split())[:400] or "no message"
        raise WeightsError(f"{uri}: not a safetensors file nor a weights-only torch checkpoint "
                           f"({type(e).__name__}: {text})") from e


def _strip_wrappers(key: str) -> str:
    for w in WRAPPERS:
        key = key.replace(w, "")
    return key


def _tower_dict(obj: dict, tower: str, source: str) -> tuple[dict, str]:
    """The tensors of one tower (teacher or student) of a DINOv2 training checkpoint, and how they were found."""
    if isinstance(obj.get(tower), dict):
        return obj[tower], f"'{tower}' entry"
    for key in ("model", "state_dict"):
        inner = obj.get(key)
        if isinstance(inner, dict) and any(_strip_wrappers(k).startswith(f"{tower}.") for k in inner):
            return {k.replace(f"{tower}.", "", 1): v for k, v in inner.items()
                    if _strip_wrappers(k).startswith(f"{tower}.")}, f"'{key}' entry, '{tower}.' keys"
    if isinstance(obj.get("model"), dict):
        return obj["model"], "'model' entry"
    if isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"], "'state_dict' entry"
    if any(k.startswith(f"{tower}.") for k in obj):
        return {k.removeprefix(f"{tower}."): v for k, v in obj.items() if k.startswith(f"{tower}.")}, f"'{tower}.' keys"
    other = "student" if tower == "teacher" else "teacher"
    if isinstance(obj.get(other), dict) or any(k.startswith(f"{other}.") for k in obj):
        raise WeightsError(f"{source}: model.init_tower={tower!r} but the checkpoint has only the {other}")
    return obj, "top level"


def parse(obj, source: str, tower: str = "teacher") -> Checkpoint:
    """Recognise the form of a loaded checkpoint object and split it into backbone and heads."""
    if not isinstance(obj, dict):
        raise WeightsError(f"{source}: expected a state dict or a training checkpoint dict, got {type(obj).__name__}")
    sd, where = _tower_dict(obj, tower, source)
    tensors = {_strip_wrappers(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{source}: no tensors found ({where}; top-level keys: {sorted(obj)[:10]})")
    if any(k.endswith("_flat_param") or "flat_param" in k for k in tensors):
        raise WeightsError(f"{source}: FSDP1 flat parameters (`_flat_param`) cannot be split into tensors without "
                           "their metadata; save a full state dict (FSDP FULL_STATE_DICT) and load that")
    notes = [f"tensors from the {where}"]
    wrapped = sorted({w for k in sd for w in WRAPPERS if w in k})
    if wrapped:
        notes.append(f"wrapper prefixes removed: {', '.join(wrapped)}")
    heads: dict[str, dict[str, torch.Tensor]] = {}
    backbone: dict[str, torch.Tensor] = {}
    trained = False
    for k, v in tensors.items():
        head = next((h for h in HEADS if k.startswith(f"{h}.")), None)
        if head:
            heads.setdefault(head, {})[k.removeprefix(f"{head}.")] = v
            trained = True
        elif k.startswith("backbone."):
            backbone[k.removeprefix("backbone.")] = v
            trained = True
        elif k.startswith(("head.", "fc_norm.", "sup_head.")):
            notes.append(f"ignored classifier tensor {k}")
        else:
            backbone[k] = v
    chunked = [k for k in backbone if CHUNKED_BLOCK.match(k)]
    if chunked:
        backbone = {CHUNKED_BLOCK.sub(r"blocks.\2.", k): v for k, v in backbone.items()}
        chunks = len({CHUNKED_BLOCK.match(k).group(1) for k in chunked})
        notes.append(f"block chunks: {chunks} chunks -> blocks.<i>")
    dinov2 = "mask_token" in backbone or "register_tokens" in backbone or any(".mlp.w12." in k for k in backbone)
    form = "dinov2-train" if trained else ("dinov2-hub" if dinov2 else "timm")
    return Checkpoint(source, form, backbone, heads, notes)


def dinov2_resize_pos_embed(patch_pos: torch.Tensor, grid: int, registers: bool) -> torch.Tensor:
    """DINOv2's resize of patch position embeddings ``[1, M*M, D]`` to ``[1, grid*grid, D]``.

    As ``interpolate_pos_encoding`` of DINOv2's ViT: bicubic, computed in float32; the models without
    registers use ``scale_factor = (grid + 0.1) / M`` and no antialias, the register models
    (``interpolate_offset=0``, ``interpolate_antialias=True``) the target size with antialias.
    """
    n, d = patch_pos.shape[1], patch_pos.shape[2]
    m = math.isqrt(n)
    if m * m != n:
        raise WeightsError(f"position embeddings over {n} patches are not a square grid")
    if m == grid:
        return patch_pos
    x = patch_pos.float().reshape(1, m, m, d).permute(0, 3, 1, 2)
    if registers:
        x = F.interpolate(x, size=(grid, grid), mode="bicubic", antialias=True)
    else:
        s = (grid + 0.1) / m
        x = F.interpolate(x, scale_factor=(s, s), mode="bicubic", antialias=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(patch_pos.dtype)


def to_timm(ckpt: Checkpoint, vit) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The checkpoint's backbone in the key layout of the timm ViT ``vit``, position embeddings on its grid.

    DINOv2 forms: ``mlp.w12``/``mlp.w3`` -> ``mlp.fc1``/``mlp.fc2`` (timm's packed SwiGLU); with
    registers, timm's DINOv2 register models keep no position for the CLS token (``no_embed_class``),
    so the CLS position is added to ``cls_token``. Returns the tensors (``mask_token`` excluded) and
    what was converted.
    """
    # timm: heavy, and the pretrain driver imports this module for WeightsError alone
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = dict(ckpt.backbone)
    sd.pop("mask_token", None)
    done = []
    grid = vit.patch_embed.grid_size[0]
    if ckpt.form == "timm":
        out = checkpoint_filter_fn(sd, vit)  # timm's own conversion and position resize for timm checkpoints
        if "pos_embed" in sd and sd["pos_embed"].shape != out["pos_embed"].shape:
            done.append(f"pos_embed {tuple(sd['pos_embed'].shape)} -> {tuple(out['pos_embed'].shape)} (timm resize)")
        return out, done
    out = {}
    for k, v in sd.items():
        k2 = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k))
        if k2 != k and "SwiGLU keys w12/w3 -> fc1/fc2" not in done:
            done.append("SwiGLU keys w12/w3 -> fc1/fc2")
        out[k2] = v
    if "pos_embed" in out:
        pos = out.pop("pos_embed")
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        resized = dinov2_resize_pos_embed(patch_pos, grid, registers=ckpt.registers > 0)
        if resized.shape != patch_pos.shape:
            how = "size, antialias" if ckpt.registers else "scale (grid + 0.1) / M, no antialias"
            done.append(f"pos_embed grid {math.isqrt(patch_pos.shape[1])} -> {grid} (DINOv2 bicubic, {how})")
        if ckpt.registers:
            out["reg_token"] = out.pop("register_tokens")
            if "cls_token" in out:
                out["cls_token"] = out["cls_token"] + cls_pos
            out["pos_embed"] = resized
            done.append(f"{ckpt.registers} register tokens -> reg_token, CLS position folded into cls_token")
        else:
            out["pos_embed"] = torch.cat([cls_pos, resized], dim=1)
    return out, done


def head_state(head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DINOv2 head's tensors in ``DINOHead`` layout: the weight-normalised prototype layer
    (``last_layer.weight_g`` / ``weight_v``, or the parametrization form) becomes
    ``last_layer.weight`` (directions) and ``last_layer.weight_g`` (gains, [K, 1]). A plain
    ``last_layer.weight`` gets its row norms as gains: the same logits."""
    out = {k: t for k, t in head.items() if not k.startswith("last_layer.") or k == "last_layer.weight"}
    g = head.get("last_layer.weight_g", head.get("last_layer.parametrizations.weight.original0"))
    v = head.get("last_layer.weight_v", head.get("last_layer.parametrizations.weight.original1"))
    if v is not None:
        out["last_layer.weight"] = v
    w = out.get("last_layer.weight")
    if w is not None:
        g = w.float().norm(dim=1) if g is None else g
        out["last_layer.weight_g"] = g.reshape(-1, 1).to(w.dtype)
    return out
