"""Pretrained weights of every form load exactly (issue #19).

The reference for "exactly" is a DINOv2 ViT forward written here from DINOv2's published model
definition (patch conv, CLS + position embeddings resized by ``interpolate_pos_encoding``, register
tokens after the CLS, pre-norm blocks with LayerScale, GELU or SwiGLU FFN, final LayerNorm), applied
to a random state dict in DINOv2's key layout; it shares no code with the loader.
"""

from __future__ import annotations

import math

import pytest
import torch
import vit_reference
from torch.nn import functional as F

from hierdino.config import load_config
from hierdino.hierarchy import load_hierarchy
from hierdino.models.backbone import build_backbone, check, load_pretrained
from hierdino.models.student_teacher import StudentTeacher
from hierdino.models.weights import WeightsError

DIM, DEPTH, HEADS, PATCH = 48, 2, 2, 8  # vit_micro_cpu and its _reg4 / _swiglu variants


def hub_state(grid: int, registers: int = 0, swiglu: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the key layout of DINOv2's hub models (``dinov2_vits14`` and friends)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    sd = {"cls_token": r(1, 1, DIM), "pos_embed": r(1, 1 + grid * grid, DIM, std=0.5), "mask_token": r(1, DIM),
          "patch_embed.proj.weight": r(DIM, 3, PATCH, PATCH), "patch_embed.proj.bias": r(DIM),
          "norm.weight": 1 + r(DIM), "norm.bias": r(DIM)}
    if registers:
        sd["register_tokens"] = r(1, registers, DIM)
    hidden = 128 if swiglu else 4 * DIM
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd |= {p + "norm1.weight": 1 + r(DIM), p + "norm1.bias": r(DIM), p + "attn.qkv.weight": r(3 * DIM, DIM),
               p + "attn.qkv.bias": r(3 * DIM), p + "attn.proj.weight": r(DIM, DIM), p + "attn.proj.bias": r(DIM),
               p + "ls1.gamma": r(DIM, std=0.5), p + "norm2.weight": 1 + r(DIM), p + "norm2.bias": r(DIM),
               p + "ls2.gamma": r(DIM, std=0.5)}
        if swiglu:
            sd |= {p + "mlp.w12.weight": r(2 * hidden, DIM), p + "mlp.w12.bias": r(2 * hidden),
                   p + "mlp.w3.weight": r(DIM, hidden), p + "mlp.w3.bias": r(DIM)}
        else:
            sd |= {p + "mlp.fc1.weight": r(hidden, DIM), p + "mlp.fc1.bias": r(hidden),
                   p + "mlp.fc2.weight": r(DIM, hidden), p + "mlp.fc2.bias": r(DIM)}
    return sd


def dinov2_forward(sd: dict, x: torch.Tensor, offset: float, antialias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv2's ViT forward on a hub state dict -> (CLS, patch tokens)."""
    b = x.shape[0]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
    h, w = t.shape[-2:]
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t.flatten(2).transpose(1, 2)], 1)
    pos = sd["pos_embed"]
    m = math.isqrt(pos.shape[1] - 1)
    if m != h or m != w:
        grid = pos[:, 1:].reshape(1, m, m, DIM).permute(0, 3, 1, 2)
        kw = {"scale_factor": ((h + offset) / m, (w + offset) / m)} if offset else {"size": (h, w)}
        grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **kw)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, DIM)], 1)
    t = t + pos
    regs = sd.get("register_tokens")
    if regs is not None:
        t = torch.cat([t[:, :1], regs.expand(b, -1, -1), t[:, 1:]], 1)
    for i in range(DEPTH):
        t = vit_reference.block(t, sd, f"blocks.{i}.", HEADS)
    t = F.layer_norm(t, (DIM,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    skip = 1 + (0 if regs is None else regs.shape[1])
    return t[:, 0], t[:, skip:]


def _features(bb, x):
    with torch.no_grad():
        return bb.eval()(x)


@pytest.mark.parametrize("arch,registers,swiglu,offset,antialias", [
    ("vit_micro_cpu", 0, False, 0.1, False),      # dinov2_vit*14: scale (g + 0.1) / M, no antialias
    ("vit_micro_cpu_reg4", 4, False, 0.0, True),   # dinov2_vit*14_reg: target size, antialias
    ("vit_micro_cpu_swiglu", 0, True, 0.1, False),  # dinov2_vitg14: SwiGLU FFN keys w12 / w3
])
def test_hub_checkpoint_computes_the_source_models_features_after_resize(tmp_path, arch, registers, swiglu, offset, antialias):
    sd = hub_state(grid=12, registers=registers, swiglu=swiglu)  # trained at 96 px (12 x 12), used at 64 px (8 x 8)
    torch.save(sd, tmp_path / "hub.pth")
    bb = build_backbone(arch, 64)
    report = load_pretrained(bb, str(tmp_path / "hub.pth"))
    assert report.form == "dinov2-hub" and report.exact and report.loaded == len(sd)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    cls, patches = _features(bb, x)
    ref_cls, ref_patches = dinov2_forward(sd, x, offset, antialias)
    assert (cls - ref_cls).abs().max() <= 1e-4 and (patches - ref_patches).abs().max() <= 1e-4
    assert torch.equal(bb.mask_token, sd["mask_token"])
    # timm's own resize differs from DINOv2's: the test would catch a loader that used it
    wrong = F.interpolate(sd["pos_embed"][:, 1:].reshape(1, 12, 12, DIM).permute(0, 3, 1, 2), size=(8, 8), mode="bicubic",
                          antialias=not antialias)
    assert (wrong.permute(0, 2, 3, 1).reshape(1, 64, DIM) - (bb.vit.pos_embed[:, -64:])).abs().max() > 1e-3


def test_hub_checkpoint_without_resize_matches_timms_own_conversion(tmp_path):
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    for arch, registers in (("vit_micro_cpu", 0), ("vit_micro_cpu_reg4", 4)):
        sd = hub_state(grid=8, registers=registers, seed=3)
        torch.save(sd, tmp_path / "hub.pth")
        ours = build_backbone(arch, 64)
        load_pretrained(ours, str(tmp_path / "hub.pth"))
        theirs = timm.create_model(arch, img_size=64, num_classes=0)
        theirs.load_state_dict(checkpoint_filter_fn(dict(sd), theirs))
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            ref = theirs.eval().forward_features(x)
        cls, patches = _features(ours, x)
        assert torch.allclose(cls, ref[:, 0], atol=1e-5) and torch.allclose(patches, ref[:, 1 + registers:], atol=1e-5)


def _training_checkpoint(sd, chunks: int | None, heads: dict, layout: str) -> dict:
    """DINOv2's trainer layouts: ``teacher_checkpoint.pth`` or ``model_<iter>.rank_0.pth`` (FSDP-wrapped keys)."""
    bb = {}
    for k, v in sd.items():
        if chunks and k.startswith("blocks."):
            i = int(k.split(".")[1])
            per = math.ceil(DEPTH / chunks)
            k = f"blocks.{i // per}.{k.removeprefix('blocks.')}"  # the chunk, then the global block index
        bb[f"backbone.{k}"] = v
    tower = bb | {f"{h}.{k}": v for h, t in heads.items() for k, v in t.items()}
    if layout == "teacher":
        return {"teacher": tower}
    return {"model": {f"{name}.{k.replace('backbone.', 'backbone._fsdp_wrapped_module.')}": v + (0.5 if name == "student" and not k.endswith("weight_g") else 0)
                      for name in ("student", "teacher") for k, v in tower.items()}, "iteration": 10}


def _dinov2_head(prototypes: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"mlp.0.weight": torch.randn(32, DIM, generator=g), "mlp.0.bias": torch.randn(32, generator=g),
            "mlp.2.weight": torch.randn(32, 32, generator=g), "mlp.2.bias": torch.randn(32, generator=g),
            "mlp.4.weight": torch.randn(16, 32, generator=g), "mlp.4.bias": torch.randn(16, generator=g),
            "last_layer.weight_g": torch.ones(prototypes, 1), "last_layer.weight_v": torch.randn(prototypes, 16, generator=g)}


def test_chunked_and_unchunked_training_checkpoints_load_identically(tmp_path):
    sd = hub_state(grid=8)
    outputs = []
    for chunks in (None, 2):
        torch.save(_training_checkpoint(sd, chunks, {}, "teacher"), tmp_path / f"c{chunks}.pth")
        bb = build_backbone("vit_micro_cpu", 64)
        report = load_pretrained(bb, str(tmp_path / f"c{chunks}.pth"))
        assert report.exact and report.form == "dinov2-train"
        assert ("block chunks" in str(report)) == bool(chunks)
        outputs.append((bb.state_dict(), _features(bb, torch.ones(1, 3, 64, 64))))
    (sd0, (c0, p0)), (sd1, (c1, p1)) = outputs
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0) and torch.equal(c0, c1) and torch.equal(p0, p1)
    assert torch.equal(sd0["vit.blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])


def _cfg(**heads):
    over = ["model.arch=vit_micro_cpu", "data.image_size=64"] + [
        f"model.{h}.{k}={v}" for h in ("dino_head", "ibot_head")
        for k, v in dict(prototypes=64, bottleneck=16, hidden=32, layers=3, batchnorm="false").items()]
    return load_config("tiny-cpu", over + [f"{k}={v}" for k, v in heads.items()])


def test_training_checkpoint_heads_load_into_student_and_teacher(tmp_path):
    sd, head = hub_state(grid=8), _dinov2_head(64)
    ckpt = _training_checkpoint(sd, 2, {"dino_head": head}, "model")  # one shared head (ibot_separate_head: false)
    torch.save(ckpt, tmp_path / "model_0000009.rank_0.pth")
    for tower, shift in (("teacher", 0.0), ("student", 0.5)):
        model = StudentTeacher(_cfg(**{"model.init_tower": tower}), load_hierarchy("wbc-h1"))
        lines = model.load_pretrained(str(tmp_path / "model_0000009.rank_0.pth"), tower=tower)
        assert any("_fsdp_wrapped_module" in line for line in lines)
        for t in (model.student, model.teacher):
            assert torch.equal(t["backbone"].vit.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"] + shift)
            for name in ("dino_head", "ibot_head"):
                assert torch.equal(t[name].mlp[2].weight, head["mlp.2.weight"] + shift)
                assert torch.equal(t[name].last_layer.weight, head["last_layer.weight_v"] + shift)
    # a head with another prototype count is a clear error, not a silent random head
    torch.save(_training_checkpoint(sd, None, {"dino_head": _dinov2_head(32)}, "teacher"), tmp_path / "k32.pth")
    with pytest.raises(WeightsError, match="dino_head.*prototypes"):
        StudentTeacher(_cfg(), load_hierarchy("wbc-h1")).load_pretrained(str(tmp_path / "k32.pth"))


def test_partial_checkpoints_are_refused_with_the_key_names(tmp_path):
    sd = hub_state(grid=8)
    del sd["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.bias"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"vit\.blocks\.1\.attn\.qkv\.weight.*init_strict"):
        load_pretrained(build_backbone("vit_micro_cpu", 64), str(tmp_path / "partial.pth"))
    report = load_pretrained(build_backbone("vit_micro_cpu", 64), str(tmp_path / "partial.pth"), strict=False)
    assert sorted(report.missing) == ["vit.blocks.1.attn.qkv.bias", "vit.blocks.1.attn.qkv.weight"]
    # register tokens into an arch without registers: refused (the tokens would be dropped silently)
    torch.save(hub_state(grid=8, registers=4), tmp_path / "reg.pth")
    with pytest.raises(WeightsError, match="reg_token"):
        load_pretrained(build_backbone("vit_micro_cpu", 64), str(tmp_path / "reg.pth"))


def test_a_run_with_a_partial_checkpoint_stops_before_any_worker(tmp_path, synth_suite):
    from hierdino.train import launch

    sd = hub_state(grid=8)
    del sd["blocks.0.norm1.weight"]
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()}}, tmp_path / "teacher_checkpoint.pth")
    cfg = load_config("tiny-cpu", [f"model.init_weights={tmp_path / 'teacher_checkpoint.pth'}", "model.arch=vit_micro_cpu",
                                   f"run.storage={tmp_path / 'runs'}", f"data.train=[{synth_suite}/synth-fine]"])
    with pytest.raises(WeightsError, match=r"vit\.blocks\.0\.norm1\.weight"):
        launch.build_trainer(cfg)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoint*"))


def test_exports_and_timm_safetensors_load_exactly(tmp_path, capsys):
    from safetensors.torch import save_file

    src = build_backbone("vit_tiny_cpu", 64)
    torch.nn.init.normal_(src.vit.pos_embed)
    save_file({k.removeprefix("vit."): v.contiguous() for k, v in src.state_dict().items() if k.startswith("vit.")},
              tmp_path / "teacher_backbone.safetensors")
    dst = build_backbone("vit_tiny_cpu", 64)
    report = load_pretrained(dst, str(tmp_path / "teacher_backbone.safetensors"))
    assert report.form == "timm" and report.exact
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_features(src, x)[0], _features(dst, x)[0])
    assert check(["check", str(tmp_path / "teacher_backbone.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "vit_tiny_cpu at 64 px" in out and "fixed-input feature norms" in out


def test_trained_head_gains_flat_tower_prefixes_and_unreadable_files(tmp_path):
    from hierdino.models.weights import read_object

    sd, head = hub_state(grid=8), _dinov2_head(64)
    head["last_layer.weight_g"] = torch.linspace(0.5, 1.5, 64)[:, None]  # DINOv2 trains its gains
    torch.save(_training_checkpoint(sd, None, {"dino_head": head}, "teacher"), tmp_path / "dinobloom.pth")
    model = StudentTeacher(_cfg(), load_hierarchy("wbc-h1"))
    model.load_pretrained(str(tmp_path / "dinobloom.pth"))  # strict (the default): the backbone is exact
    assert torch.equal(model.teacher["dino_head"].last_layer.weight, head["last_layer.weight_v"])  # the directions
    # ... and its gains: the head's logits are DINOv2's, g_k * <z, v_k> / |v_k| for the normalised MLP
    # output z, computed by hand from the checkpoint's tensors
    F = torch.nn.functional
    x = torch.randn(5, DIM)
    h = F.gelu(x @ head["mlp.0.weight"].T + head["mlp.0.bias"])
    h = F.gelu(h @ head["mlp.2.weight"].T + head["mlp.2.bias"])
    z = F.normalize(h @ head["mlp.4.weight"].T + head["mlp.4.bias"], dim=-1)
    v = head["last_layer.weight_v"]
    by_hand = head["last_layer.weight_g"].T * (z @ v.T) / v.norm(dim=1)
    with torch.no_grad():
        assert torch.allclose(model.teacher["dino_head"](x), by_hand, atol=1e-5)
    # a flat dict with both towers' prefixes (DINOv2's ckpt["model"] saved on its own): each tower loads
    flat = _training_checkpoint(sd, None, {}, "model")["model"]
    torch.save(flat, tmp_path / "flat.pth")
    for tower, shift in (("teacher", 0.0), ("student", 0.5)):
        bb = build_backbone("vit_micro_cpu", 64)
        load_pretrained(bb, str(tmp_path / "flat.pth"), tower=tower)
        assert torch.equal(bb.vit.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"] + shift)
    # the format comes from the bytes: safetensors under a .pth name loads; empty and truncated files are named
    import safetensors.torch

    (tmp_path / "named.pth").write_bytes(safetensors.torch.save({"cls_token": torch.ones(1, 1, 4)}))
    assert torch.equal(read_object(str(tmp_path / "named.pth"))["cls_token"], torch.ones(1, 1, 4))
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"empty.pth: the file is empty"):
        read_object(str(tmp_path / "empty.pth"))
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "named.pth").read_bytes()[:40])
    with pytest.raises(WeightsError, match=r"cut.safetensors: not a safetensors file nor"):
        read_object(str(tmp_path / "cut.safetensors"))
