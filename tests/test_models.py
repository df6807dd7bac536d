import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import vit_reference
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hierdino.config import load_config
from hierdino.data.augment import augment_views
from hierdino.data.synth import DOMAINS, leaf_spec, render_cell
from hierdino.hierarchy import load_hierarchy
from hierdino.models.backbone import build_backbone, load_pretrained
from hierdino.models.heads import DINOHead
from hierdino.models.student_teacher import StudentTeacher, param_groups
from hierdino.models.weights import WeightsError
from hierdino.train.loop import TrainStep, make_step_batch


def _randomise(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random values for every parameter (norm gains near 1, LayerScale gammas ~0.5, so that every block
    counts; at the init gammas of 1e-5 a forward that skipped the blocks would pass). Returns them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = 0.5 if ("gamma" in name or "pos_embed" in name or "mask_token" in name) else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def vit_by_hand(sd, x, dim, heads, depth, patch, masks=None, antialias=True, mask_after_pos=False):
    """A pre-norm ViT forward written from its definition (shares no code with Backbone or timm's
    modules): patch conv; masked patch embeddings replaced by the mask token; CLS prepended; position
    embeddings (bicubic-resized, as timm's dynamic image size, when the grid differs) added; blocks
    t + ls1 * attn(LN(t)), t + ls2 * fc2(GELU(fc1(LN(t)))); final LN. -> (CLS, patch tokens)."""
    b = x.shape[0]
    t = F.conv2d(x, sd["vit.patch_embed.proj.weight"], sd["vit.patch_embed.proj.bias"], stride=patch)
    h, w = t.shape[-2:]
    t = t.flatten(2).transpose(1, 2)  # [B, h*w, D], row-major patches
    if masks is not None and not mask_after_pos:
        t = torch.where(masks[..., None], sd["mask_token"].view(1, 1, dim), t)
    t = torch.cat([sd["vit.cls_token"].expand(b, -1, -1), t], 1)
    pos = sd["vit.pos_embed"]
    m = math.isqrt(pos.shape[1] - 1)
    if (m, m) != (h, w):
        grid = pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=antialias)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)], 1)
    t = t + pos
    if masks is not None and mask_after_pos:  # a negative control: the wrong place for the mask token
        t = torch.cat([t[:, :1], torch.where(masks[..., None], sd["mask_token"].view(1, 1, dim), t[:, 1:])], 1)
    for i in range(depth):
        t = vit_reference.block(t, sd, f"vit.blocks.{i}.", heads)
    t = F.layer_norm(t, (dim,), sd["vit.norm.weight"], sd["vit.norm.bias"], eps=1e-6)
    return t[:, 0], t[:, 1:]


def _close(a, b, tol=1e-4):
    return (a - b).abs().max().item() <= tol


def test_backbone_shapes_masking_and_bad_arch():
    """vit_tiny_cpu (patch 8, 96 wide, 4 blocks of 3 heads: stated here, not read from the model) computes
    the hand-written ViT forward with random weights: plain, with iBOT masks, and on 32 px local crops."""
    bb = build_backbone("vit_tiny_cpu", 64).eval()
    sd = _randomise(bb, seed=0)
    arch = dict(dim=96, heads=3, depth=4, patch=8)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[0, :10] = True
    masks[0, 40:43] = True
    with torch.no_grad():
        cls, patches = bb(x)
        cls_m, patches_m = bb(x, masks)
        small_cls, small_patches = bb(x[:, :, ::2, ::2])  # local crops: interpolated position embeddings
    assert cls.shape == (2, 96) and patches.shape == (2, 64, 96) and small_patches.shape == (2, 16, 96)
    ref_cls, ref_patches = vit_by_hand(sd, x, **arch)
    assert _close(cls, ref_cls) and _close(patches, ref_patches)
    ref_cls_m, ref_patches_m = vit_by_hand(sd, x, **arch, masks=masks)
    assert _close(cls_m, ref_cls_m) and _close(patches_m, ref_patches_m)
    ref_small = vit_by_hand(sd, x[:, :, ::2, ::2], **arch)
    assert _close(small_cls, ref_small[0]) and _close(small_patches, ref_small[1])
    # negative controls: each would be missed by a forward that ignored masks, masked after the position
    # embeddings, or resized them without antialiasing
    assert torch.allclose(cls_m[1], cls[1], atol=1e-5) and not _close(cls_m[0], cls[0], 1e-2)
    wrong = vit_by_hand(sd, x, **arch, masks=masks, mask_after_pos=True)
    assert not _close(cls_m, wrong[0], 1e-2) and not _close(patches_m, wrong[1], 1e-2)
    assert not _close(small_patches, vit_by_hand(sd, x[:, :, ::2, ::2], **arch, antialias=False)[1], 1e-3)
    with pytest.raises(ValueError, match="vit_small_patch14_dinov2"):
        build_backbone("vit_smal_patch14_dinov2", 224)
    with pytest.raises(ValueError, match="multiple"):
        build_backbone("vit_tiny_cpu", 60)


def test_timm_dinov2_arch_builds_without_download():
    """vit_small_patch14_dinov2 is DINOv2's ViT-S/14 (384 wide, 12 blocks of 6 heads, MLP 1536, LayerScale):
    with random weights it computes the hand-written forward with those numbers, at 56 px (a 4 x 4 grid)."""
    bb = build_backbone("vit_small_patch14_dinov2", 56).eval()
    assert bb.patch_size == 14 and bb.embed_dim == 384 and bb.vit.pos_embed.shape[1] == 1 + 16
    sd = _randomise(bb, seed=2)
    assert sd["vit.blocks.11.mlp.fc1.weight"].shape == (1536, 384) and "vit.blocks.12.norm1.weight" not in sd
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cls, patches = bb(x)
    ref_cls, ref_patches = vit_by_hand(sd, x, dim=384, heads=6, depth=12, patch=14)
    assert _close(cls, ref_cls, 1e-3) and _close(patches, ref_patches, 1e-3)
    # another head count gives other features: the check sees the attention layout
    assert not _close(cls, vit_by_hand(sd, x, dim=384, heads=12, depth=12, patch=14)[0], 1e-2)


def test_loads_dinov2_and_dinobloom_formats_with_pos_embed_interpolation(tmp_path):
    src = build_backbone("vit_tiny_cpu", 80)  # 10x10 grid
    hub = {k.removeprefix("vit."): v for k, v in src.state_dict().items()}  # DINOv2 hub-style keys incl. mask_token
    hub["mask_token"] = torch.randn(1, 96)
    torch.save(hub, tmp_path / "hub.pth")
    torch.save({"teacher": {f"backbone.{k}": v for k, v in hub.items()} | {"dino_head.mlp.0.weight": torch.zeros(2)}},
               tmp_path / "dinobloom.pth")
    for name in ("hub.pth", "dinobloom.pth"):
        dst = build_backbone("vit_tiny_cpu", 64)  # 8x8 grid
        report = load_pretrained(dst, str(tmp_path / name))
        assert report.missing == [] and report.unexpected == []
        assert torch.equal(dst.vit.blocks[1].attn.qkv.weight, src.vit.blocks[1].attn.qkv.weight)
        assert dst.vit.pos_embed.shape == (1, 65, 96) and torch.equal(dst.mask_token, hub["mask_token"])
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in hub.items() if k != "mask_token"}, tmp_path / "w.safetensors")
    report = load_pretrained(build_backbone("vit_tiny_cpu", 64), str(tmp_path / "w.safetensors"))
    assert report.exact and "no mask_token" in str(report)
    torch.save({"weird": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="NOT IN CHECKPOINT .*UNUSED FROM CHECKPOINT .*weird"):
        load_pretrained(build_backbone("vit_tiny_cpu", 64), str(tmp_path / "bad.pth"))


def test_head_batchnorm_of_a_padded_buffer_is_over_its_real_rows():
    """``DINOHead(x, valid)``: the real rows' logits, gradients and BatchNorm running statistics are those
    of the head on the real rows alone (padding rows, here far off, change nothing); in evaluation, row by row."""
    import copy

    torch.manual_seed(0)
    head = DINOHead(16, 32, hidden=24, bottleneck=8, layers=3, batchnorm=True)
    alone = copy.deepcopy(head)
    x = torch.randn(10, 16)
    x[7:] = 100 * torch.randn(3, 16)
    valid = torch.tensor([True] * 7 + [False] * 3)
    out, ref = head(x, valid), alone(x[:7])
    assert torch.allclose(out[:7], ref, rtol=1e-5, atol=1e-6)
    out[:7].square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(head.named_parameters(), alone.parameters()):  # (biases before a BatchNorm: 0 and noise)
        assert (p.grad - q.grad).norm() <= 1e-5 * q.grad.norm() + 1e-4, name
    for (name, b), c in zip(head.named_buffers(), alone.buffers()):
        assert torch.allclose(b.float(), c.float(), rtol=1e-5, atol=1e-6), name
    head.eval(), alone.eval()
    with torch.no_grad():
        assert torch.allclose(head(x, valid), alone(x), rtol=1e-5, atol=1e-6)


def test_dino_head_normalised_prototypes():
    head = DINOHead(16, 32, hidden=24, bottleneck=8, layers=3)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = head(x)
    assert out.shape == (5, 32) and out.abs().max() <= 1.0 + 1e-5  # cosine similarities at gains 1
    # against the definition with the head's own (random) weights and gains other than 1:
    # z = L(GELU(L(GELU(L(x))))), z / |z|, logits_k = g_k * <z, v_k> / |v_k|
    sd = _randomise(head, seed=4)
    lin = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert len(lin) == 3 and [m.out_features for m in lin] == [24, 24, 8]
    z = x
    for i, m in enumerate(lin):
        z = z @ m.weight.detach().T + m.bias.detach()
        z = F.gelu(z) if i < 2 else z
    z = z / z.norm(dim=1, keepdim=True)
    v, gain = sd["last_layer.weight"], sd["last_layer.weight_g"]
    expected = gain.view(1, -1) * (z @ v.T) / v.norm(dim=1).view(1, -1)
    with torch.no_grad():
        assert torch.allclose(head(x), expected, atol=1e-5)
        # weight norm: scaling a prototype's direction changes nothing, its gain scales its logit
        head.last_layer.weight[3] *= 7.0
        head.last_layer.weight_g[5] *= 2.0
        out2 = head(x)
    assert torch.allclose(out2[:, 3], expected[:, 3], atol=1e-5) and torch.allclose(out2[:, 5], 2 * expected[:, 5], atol=1e-5)
    # known output for known weights: one identity linear layer; x = (3, 4) -> z = (0.6, 0.8);
    # directions (5, 0), (0, 2), (1, 1) with gains 1, 2, 3 -> 0.6, 2 * 0.8, 3 * 1.4 / sqrt(2)
    small = DINOHead(2, 3, bottleneck=2, layers=1)
    with torch.no_grad():
        small.mlp[0].weight.copy_(torch.eye(2))
        small.mlp[0].bias.zero_()
        small.last_layer.weight.copy_(torch.tensor([[5.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
        small.last_layer.weight_g.copy_(torch.tensor([[1.0], [2.0], [3.0]]))
        got = small(torch.tensor([[3.0, 4.0]]))
    assert got[0].tolist() == pytest.approx([0.6, 1.6, 3 * 1.4 / math.sqrt(2)], rel=1e-6)


def test_ema_update_maths():
    cfg = load_config("tiny-cpu", ["model.arch=vit_micro_cpu"])
    m = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    t_before = [p.clone() for p in m.teacher.parameters()]
    s_now = [p.clone() for p in m.student.parameters()]
    m.update_teacher(0.9)
    for t0, s, t1 in zip(t_before, s_now, m.teacher.parameters()):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s, atol=1e-6)
    assert m.sup_head is not None and not any(n.startswith("sup") for n, _ in m.teacher.named_parameters())


def test_param_groups_layerwise_decay():
    cfg = load_config("tiny-cpu")
    m = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
    groups = param_groups(m, 0.5, 0.2)
    ids = {id(p): g for g in groups for p in g["params"]}
    bb = m.student["backbone"]
    depth = len(bb.blocks)
    assert ids[id(bb.vit.blocks[depth - 1].mlp.fc1.weight)]["lr_mult"] == pytest.approx(0.5)
    assert ids[id(bb.vit.blocks[0].mlp.fc1.weight)]["lr_mult"] == pytest.approx(0.5 ** depth)
    assert ids[id(bb.vit.patch_embed.proj.weight)]["lr_mult"] == pytest.approx(0.5 ** (depth + 1) * 0.2)
    # DINOv2's rule: no decay on biases, norms and LayerScale gammas; tokens, position embeddings and the
    # prototype gains are decayed
    assert ids[id(bb.vit.blocks[0].norm1.weight)]["wd_mult"] == 0.0 and ids[id(bb.vit.blocks[0].attn.qkv.bias)]["wd_mult"] == 0.0
    assert all(ids[id(p)]["wd_mult"] == 1.0 for p in (bb.vit.pos_embed, bb.vit.cls_token, bb.mask_token))
    last = m.student["dino_head"].last_layer
    assert ids[id(last.weight)]["last_layer"] and ids[id(last.weight_g)]["last_layer"] and ids[id(last.weight_g)]["wd_mult"] == 1.0
    assert ids[id(m.sup_head.linear.weight)]["lr_mult"] == 1.0
    assert not any(id(p) in ids for p in m.teacher.parameters())


def _synthetic_raw(n=32, seed=0):
    h = load_hierarchy("wbc-h1")
    rng = np.random.default_rng(seed)
    leaves = [h.leaves[i % 6] for i in range(n)]
    imgs = np.stack([render_cell(leaf_spec(h, leaf), DOMAINS["A"], 64, rng) for leaf in leaves])
    g = torch.from_numpy(imgs)
    return {"global": torch.stack([g, g.flip(2)], 1), "local": torch.stack([g[:, ::2, ::2]] * 2, 1).contiguous(),
            "sup": g.clone(), "label": torch.tensor([h.index(leaf) if i % 3 else -1 for i, leaf in enumerate(leaves)]),
            "ok": torch.ones(n, dtype=torch.bool)}


def _tiny_run(*overrides, steps=40):
    torch.manual_seed(0)
    cfg = load_config("tiny-cpu", [f"train.steps={steps}", "optim.warmup_steps=5", "optim.freeze_last_layer_steps=0",
                                   *overrides])
    m = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
    step = TrainStep(m, cfg)
    raw = _synthetic_raw()
    gen = torch.Generator().manual_seed(0)
    return [step(make_step_batch(raw, cfg, gen, torch.device("cpu"), 8), i, monitor=i == steps - 1) for i in range(steps)]


def test_seeded_tiny_run_learns_without_collapse():
    """40 seeded steps of the tiny-cpu recipe: the loss falls and the DINO targets stay image-dependent.

    Measured (2 CPUs): at step 40 the tiny-cpu recipe has entropy ratio 0.66-0.75, 15-28 distinct teacher
    argmaxes of 64 crops and CLS spread 0.33-0.60 over five seeds of the mask generator (this one, at
    supervised weight 1.0: 0.75, 15, 0.60; at the preset's 0.5: 0.71, 16, 0.62); the first release's recipe (layer scale 1e-5, no head BatchNorm, teacher temperature to 0.07) has
    0.994, 1 prototype and spread 0.12 after 20 steps. The bounds sit between the two: entropy 0.9 (the
    issue's healthy bound), at least 10 prototypes (a collapsed teacher has 1).
    """
    out = _tiny_run()
    losses = [o["loss"] for o in out]
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    last = out[-1]
    assert last["dino_entropy"] < 0.9, last
    assert last["distinct_protos"] >= 10 and last["cls_spread"] > 0.25 and 0 < last["labelled"] < 1
    old = _tiny_run("model.layerscale_init=1e-5", "model.dino_head.batchnorm=false", "model.ibot_head.batchnorm=false",
                    "loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.07", "loss.warmup_teacher_temp_steps=5", steps=20)
    assert old[-1]["dino_entropy"] > 0.98 and old[-1]["cls_spread"] < 0.2  # the monitor flags the first release's collapse


def test_non_finite_step_is_not_applied_then_stops_the_run_past_the_allowance(said):
    """A NaN loss at the 8th step (index 7; messages count steps as the progress line): the parameters and optimiser state stay as they were (fused AdamW with
    found_inf decides on the device), a warning within train.skip_nonfinite_steps, then an error."""
    from hierdino.train.loop import NonFiniteLossError

    cfg = load_config("tiny-cpu", ["model.arch=vit_micro_cpu", "train.skip_nonfinite_steps=1"])
    m = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
    step = TrainStep(m, cfg)
    batch = make_step_batch(_synthetic_raw(8), cfg, torch.Generator().manual_seed(0), torch.device("cpu"), 8)
    step(batch, 6, sync=False)  # one good step: the optimiser has state
    before = {k: v.detach().clone() for k, v in m.student.named_parameters()}
    opt_before = [s["exp_avg"].clone() for s in step.optimizer.state.values()]
    w = m.student["dino_head"].mlp[0].weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.fill_(float("nan"))  # a forward that produces NaN
    out = step(batch, 7, sync=True)
    with torch.no_grad():
        w.copy_(saved)
    assert all(torch.equal(before[k], v) for k, v in m.student.named_parameters())
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(opt_before, step.optimizer.state.values()))
    assert any("step 8 skipped, non-finite: loss=nan, dino=nan" in line for line in said)
    assert out is not None and step.skipped == 1
    with torch.no_grad():
        w.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 9 .*not applied.*loss=nan, dino=nan"):
        step(batch, 8)


def test_a_non_finite_gradient_under_finite_losses_is_named_in_the_error():
    """Finite loss terms, an infinite gradient (as memory overwritten under the backward would give):
    the step is not applied and the error names the gradient norm, not only the finite losses."""
    from hierdino.train.loop import NonFiniteLossError

    cfg = load_config("tiny-cpu", ["model.arch=vit_micro_cpu"])
    m = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
    step = TrainStep(m, cfg)
    batch = make_step_batch(_synthetic_raw(8), cfg, torch.Generator().manual_seed(0), torch.device("cpu"), 8)
    m.student["backbone"].blocks[0].mlp.fc1.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1 .*dino=[0-9.]+, .*grad_norm_backbone=(inf|nan)"):
        step(batch, 0)


def test_batches_without_labels_or_masks_still_run_every_forward():
    """FSDP2 forwards are collectives: a rank with no labelled image must run the same modules."""
    cfg = load_config("tiny-cpu", ["model.arch=vit_micro_cpu", "data.mask_sample_prob=0.0", "data.local_crops_number=2",
                                   "data.supervised_view=separate"])
    m = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
    calls = []
    m.student["backbone"].register_forward_hook(lambda *_: calls.append("backbone"))
    m.student["ibot_head"].register_forward_hook(lambda *_: calls.append("ibot"))
    raw = _synthetic_raw(4)
    raw["label"][:] = -1
    batch = make_step_batch(raw, cfg, torch.Generator().manual_seed(0), torch.device("cpu"), 8)
    assert batch.sup_images.shape[0] == 4 and not batch.masks.any() and batch.mask_index.numel() == 0  # fixed shapes
    loss, terms, _ = m.losses(batch, 0.04)
    assert calls.count("backbone") == 2 and calls.count("ibot") == 1  # global (+ supervised views), local
    assert terms["sup"].item() == 0.0 and terms["ibot"].item() == 0.0 and terms["sup"].requires_grad
    loss.backward()
    raw = _synthetic_raw(4)  # with labelled images: the same forwards
    calls.clear()
    m.losses(make_step_batch(raw, cfg, torch.Generator().manual_seed(0), torch.device("cpu"), 8), 0.04)
    assert calls.count("backbone") == 2


def test_supervised_views_share_the_global_forward_without_leaking_into_it():
    """The supervised views ride in the global crops' forward as unmasked rows, one per image (fixed
    shapes): the supervised term equals the loss of the head on a forward of the labelled views alone,
    and the DINO / iBOT terms equal those of the global crops alone (the backbone treats every image
    on its own; no drop path here)."""
    cfg = load_config("tiny-cpu", ["model.arch=vit_micro_cpu", "data.supervised_view=separate", "data.mask_sample_prob=0.5"])
    torch.manual_seed(0)
    m = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
    batch = make_step_batch(_synthetic_raw(6), cfg, torch.Generator().manual_seed(0), torch.device("cpu"), 8)
    has = batch.labels >= 0
    assert batch.sup_images.shape[0] == 6 and int(has.sum()) == 4 and batch.masks.any()
    _, terms, _ = m.losses(batch, 0.04)
    alone = m.sup_loss(m.sup_head(m.student["backbone"](batch.sup_images[has])[0]), batch.labels[has])
    assert terms["sup"].item() == pytest.approx(alone.item(), rel=1e-5)
    torch.manual_seed(0)  # a fresh copy: the call above moved the teacher centres
    fresh = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
    _, without, _ = fresh.losses(replace(batch, sup_images=None), 0.04)
    assert without["dino"].item() == pytest.approx(terms["dino"].item(), rel=1e-5)
    assert without["ibot"].item() == pytest.approx(terms["ibot"].item(), rel=1e-5)


def test_drop_path_uniform_gives_every_block_the_rate():
    from timm.layers import DropPath

    from hierdino.models.backbone import build_backbone

    uniform = build_backbone("vit_tiny_cpu", 64, 0.3, 1e-5, drop_path_uniform=True)
    assert [b.drop_path1.drop_prob for b in uniform.blocks] == [0.3] * 4
    assert all(isinstance(b.drop_path2, DropPath) and b.drop_path2.drop_prob == 0.3 for b in uniform.blocks)
    linear = build_backbone("vit_tiny_cpu", 64, 0.3, 1e-5, drop_path_uniform=False)
    assert not isinstance(linear.blocks[0].drop_path1, DropPath)  # timm: 0 for the first block, rising to 0.3
    assert linear.blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)


def test_subset_residual_adds_the_scaled_branch_to_a_random_subset_and_is_unbiased():
    """DINOv2's batch-subset stochastic depth, against a per-row reference: exactly floor((1-p)B) rows
    get x + branch(x) * B/k, the rest pass unchanged, the branch sees only those rows, and over many
    draws each row's mean update is the branch's output (per-sample drop path's expectation)."""
    from hierdino.models.backbone import subset_residual

    torch.manual_seed(0)
    b, p = 10, 0.3
    x = torch.randn(b, 3, 4)
    weight = torch.randn(4, 4)
    seen = []

    def branch(y):
        seen.append(y.shape[0])
        return y @ weight

    out = subset_residual(x, branch, p)
    changed = [i for i in range(b) if not torch.equal(out[i], x[i])]
    assert len(changed) == seen[0] == 7  # floor(0.7 * 10)
    for i in range(b):
        expected = x[i] + x[i] @ weight * (b / 7) if i in changed else x[i]
        assert torch.allclose(out[i], expected, atol=1e-5), i
    draws = torch.stack([subset_residual(x, branch, p) for _ in range(3000)])
    update = draws.mean(0) - x
    sd = (draws - x).std(0) / math.sqrt(3000)  # standard error of each mean
    assert ((update - x @ weight).abs() <= 5 * sd + 1e-5).all()
    assert subset_residual(x[:1], branch, 0.9).shape == (1, 3, 4) and seen[-1] == 1  # at least one row runs
    assert torch.equal(subset_residual(x, branch, 1.0), x)  # rate 1: always dropped, as per-sample drop path


def test_blocks_above_a_drop_rate_of_0_1_run_their_branches_on_the_kept_samples_only():
    """The student's blocks (drop rate 0.3) do (1 - p) of the eval forward's FLOPs while training;
    in eval mode, at rate 0 (the teacher) and at 0.1 they compute exactly timm's block."""
    from timm.models.vision_transformer import Block
    from torch.utils.flop_counter import FlopCounterMode

    from hierdino.models.backbone import SubsetDepthBlock, build_backbone

    torch.manual_seed(0)
    bb = build_backbone("vit_tiny_cpu", 64, 0.3, 1e-5, drop_path_uniform=True)
    assert all(type(blk) is SubsetDepthBlock for blk in bb.blocks)
    x = torch.randn(20, 3, 64, 64)

    def flops(train: bool) -> int:
        bb.train(train)
        with FlopCounterMode(display=False) as fc:
            bb(x)
        return fc.get_total_flops()

    evaluated, trained = flops(False), flops(True)
    patch_embed = 2 * 20 * 64 * 3 * 8 * 8 * 96  # the only FLOPs outside the blocks (conv stem)
    assert (trained - patch_embed) == pytest.approx(0.7 * (evaluated - patch_embed), rel=1e-6)  # 14 of 20 rows
    cls, _ = bb(x)
    cls.sum().backward()
    assert bb.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    t = torch.randn(6, 65, 96)
    for rate, train in ((0.3, False), (0.0, True), (0.1, True)):
        blk = bb.blocks[0]
        blk.drop_path1.drop_prob = blk.drop_path2.drop_prob = rate
        blk.train(train)
        plain = Block(96, 3, qkv_bias=True, init_values=1e-5)
        plain.load_state_dict(blk.state_dict())  # the same keys: checkpoints load either way
        plain.train(train)
        torch.manual_seed(1)
        got = blk(t)
        torch.manual_seed(1)
        assert torch.equal(got, plain(t) if rate < 0.1 or not train else _timm_drop_path(plain, t, rate)), (rate, train)


def _timm_drop_path(block, t, rate):
    from timm.layers import DropPath

    block.drop_path1, block.drop_path2 = DropPath(rate), DropPath(rate)
    return block(t)


def test_each_student_submodule_is_clipped_on_its_own():
    """DINOv2 clips backbone and each head separately: after the step every group's norm was <= clip."""
    cfg = load_config("tiny-cpu", ["model.arch=vit_micro_cpu", "optim.clip_grad=0.01", "optim.freeze_last_layer_steps=0"])
    torch.manual_seed(0)
    m = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
    step = TrainStep(m, cfg)
    seen = {}
    orig = torch.optim.AdamW.step

    def spy(opt, *a, **k):  # the gradients as the optimizer sees them
        for name, params in m.clip_groups().items():
            grads = [p.grad.flatten() for p in params if p.grad is not None]
            seen[name] = float(torch.cat(grads).norm()) if grads else 0.0
        return orig(opt, *a, **k)

    torch.optim.AdamW.step = spy
    try:
        out = step(make_step_batch(_synthetic_raw(8), cfg, torch.Generator().manual_seed(0), torch.device("cpu"), 8), 0)
    finally:
        torch.optim.AdamW.step = orig
    assert set(seen) == {"backbone", "dino_head", "ibot_head", "sup_head"}
    assert all(v <= 0.01 * 1.001 for v in seen.values()), seen
    assert all(out[f"grad_norm_{k}"] > 0.01 for k in seen)  # each was above the bound before clipping


def test_bf16_autocast_runs_backbone_and_heads_in_bf16_and_the_losses_in_fp32(monkeypatch):
    """One-worker bf16 (#13): backbone and DINO / iBOT head matmuls in bf16, their logits cast to fp32
    before targets and losses; the losses stay within bf16 rounding of the same model in fp32."""
    cfg = load_config("tiny-cpu", ["model.arch=vit_micro_cpu"])
    torch.manual_seed(0)
    m = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
    batch = make_step_batch(_synthetic_raw(8), cfg, torch.Generator().manual_seed(0), torch.device("cpu"), 8)
    ref_loss, ref_terms, _ = m.losses(batch, 0.04)  # fp32 throughout
    m.autocast = True
    dtypes, into_losses = {}, []

    def record(name):
        def hook(mod, inputs, out):
            dtypes.setdefault(name, (out[0] if isinstance(out, tuple) else out).dtype)
        return hook

    m.student["backbone"].vit.blocks[0].attn.qkv.register_forward_hook(record("backbone"))
    m.student["dino_head"].mlp[0].register_forward_hook(record("dino_mlp"))
    m.student["dino_head"].register_forward_hook(record("dino_head"))
    m.teacher["ibot_head"].register_forward_hook(record("teacher_ibot_head"))
    m.sup_head.register_forward_hook(record("sup_head"))
    orig = m.ibot_loss
    monkeypatch.setattr(m, "ibot_loss", lambda s, t, *a: into_losses.append((s.dtype, t.dtype)) or orig(s, t, *a))
    loss, terms, _ = m.losses(batch, 0.04)
    assert dtypes == {"backbone": torch.bfloat16, "dino_mlp": torch.bfloat16, "dino_head": torch.bfloat16,
                      "teacher_ibot_head": torch.bfloat16, "sup_head": torch.float32}
    assert into_losses == [(torch.float32, torch.float32)]  # student logits and teacher targets
    assert loss.dtype == torch.float32 and all(t.dtype == torch.float32 for t in terms.values())
    for k in ("dino", "ibot", "sup"):
        assert terms[k].item() == pytest.approx(ref_terms[k].item(), rel=0.02), k
        assert terms[k].item() != ref_terms[k].item(), k  # bf16 did run
    loss.backward()  # outside autocast
    assert m.student["backbone"].vit.blocks[0].attn.qkv.weight.grad.dtype == torch.float32
    assert m.student["dino_head"].last_layer.weight.grad.dtype == torch.float32


def test_freeze_backbone_steps_holds_the_backbone_while_the_heads_learn():
    cfg = load_config("tiny-cpu", ["model.arch=vit_micro_cpu", "train.freeze_backbone_steps=2", "optim.warmup_steps=0",
                                   "optim.freeze_last_layer_steps=0"])
    torch.manual_seed(0)
    m = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
    step = TrainStep(m, cfg)
    raw = _synthetic_raw(8)

    def snapshot():
        return {n: p.detach().clone() for n, p in m.student.named_parameters()}

    gen = torch.Generator().manual_seed(0)
    before = snapshot()
    for i in range(2):
        step(make_step_batch(raw, cfg, gen, torch.device("cpu"), 8), i)
    frozen = snapshot()
    assert all(torch.equal(frozen[n], before[n]) for n in before if n.startswith("backbone."))
    assert not torch.equal(frozen["dino_head.mlp.0.weight"], before["dino_head.mlp.0.weight"])
    assert all(torch.allclose(t, s, atol=1e-6) for t, s in zip(m.teacher["backbone"].parameters(), m.student["backbone"].parameters()))
    step(make_step_batch(raw, cfg, gen, torch.device("cpu"), 8), 2)
    assert not torch.equal(m.student["backbone"].vit.blocks[0].attn.qkv.weight, frozen["backbone.vit.blocks.0.attn.qkv.weight"])


class _HostReads(TorchDispatchMode):
    """Records the ops that make a GPU wait for the host: reading a value back (``.item()``,
    ``bool(t)``, ``.tolist()``), computing a data-dependent shape (``nonzero``, boolean-mask
    indexing), or building a tensor from Python or NumPy data (``lift_fresh``: on a GPU a blocking
    copy from pageable memory, queued behind every kernel before it). torch.optim's own reads of its
    host-side step counters are not ours and are skipped."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        syncing = func in (aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default,
                           aten.masked_select.default, aten.equal.default, aten.lift_fresh.default)
        if func is aten.index.Tensor:
            syncing = any(t is not None and t.dtype == torch.bool for t in args[1])
        if syncing:
            import traceback

            stack = traceback.extract_stack()
            if not any("/torch/optim/" in f.filename for f in stack):
                ours = [f for f in stack if "/hierdino/" in f.filename]
                self.calls.append((str(func), f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "?"))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("extra", [[], ["data.local_crops_number=2", "data.supervised_view=separate",
                                        "loss.centering=sinkhorn", "loss.koleo_weight=0.1", "loss.supervised.kind=flat"]])
def test_a_step_between_log_steps_reads_nothing_back_from_the_device(extra):
    cfg = load_config("tiny-cpu", ["model.arch=vit_micro_cpu", "optim.warmup_steps=0", "optim.freeze_last_layer_steps=0",
                                   *extra])
    torch.manual_seed(0)
    m = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
    step = TrainStep(m, cfg)
    gen = torch.Generator().manual_seed(0)
    raw = _synthetic_raw(8)
    step(make_step_batch(raw, cfg, gen, torch.device("cpu"), 8), 0)  # warm: lazily created state
    batch = make_step_batch(raw, cfg, gen, torch.device("cpu"), 8)
    with _HostReads() as reads:
        assert step(batch, 1, sync=False) is None
    assert reads.calls == []
    # The device half of a batch builds no tensor from host data (its CPU path selects rows with
    # ``nonzero``, free there; on a GPU it selects on the device).
    views = (raw["global"], raw["local"] if cfg.data.local_crops_number else None, raw["sup"])
    with _HostReads() as reads:
        augment_views(*views, gen)
    assert [c for c in reads.calls if "lift_fresh" in c[0]] == []
    with _HostReads() as reads:  # the check itself sees reads: a log step makes them
        out = step(batch, 2, monitor=True, sync=True)
    assert reads.calls and math.isfinite(out["dino"])


_VOTES_FROM = [(1, 4), (None, 4), (None, None)]  # per scenario, the step from which each rank is asked to stop


def _stop_vote_rank(rank: int, init: str, out: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        cfg = load_config("tiny-cpu", ["model.arch=vit_micro_cpu", "optim.warmup_steps=0"])
        reads = []
        for votes_from in _VOTES_FROM:
            torch.manual_seed(0)
            step = TrainStep(StudentTeacher(cfg, load_hierarchy("wbc-h1")), cfg)
            gen, raw, mine = torch.Generator().manual_seed(rank), _synthetic_raw(4, seed=rank), []
            for i in range(6):
                sync = (i + 1) % 3 == 0
                rec = step(make_step_batch(raw, cfg, gen, torch.device("cpu"), 8), i, sync=sync,
                           stop_vote=votes_from[rank] is not None and i >= votes_from[rank])
                if sync:
                    mine.append(rec["stop_votes"])
            reads.append(mine)
        with open(f"{out}/{rank}.json", "w") as f:
            json.dump(reads, f)
    finally:
        dist.destroy_process_group()


def test_ranks_asked_to_stop_at_different_steps_read_the_same_votes(tmp_path):
    """A graceful stop reaches each rank at its own step; the votes ride in the loss all-reduce, so at
    each read (every 3rd step here) both ranks see the same count and stop after the same step."""
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_stop_vote_rank, args=(f"tcp://127.0.0.1:{port}", str(tmp_path)), nprocs=2)
    reads = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert reads[0] == reads[1], reads
    # Reads after steps 3 and 6 (indices 2 and 5), in votes per rank: rank 0 asked from index 1 gives
    # 2 votes by the first read, then 3 more with rank 1's 2 (from index 4): 1.0, 2.5. Only rank 1
    # asked from index 4: 0.0 at the first read, 1.0 at the second. Nobody asked: 0.0, 0.0.
    assert reads[0] == [pytest.approx([1.0, 2.5]), pytest.approx([0.0, 1.0]), [0.0, 0.0]], reads


def test_select_rows_picks_the_masked_rows_on_the_host_and_on_another_device():
    from hierdino.data.transfer import select_rows

    t, mask = torch.arange(12).view(6, 2), torch.tensor([True, False, True, True, False, False])
    assert torch.equal(select_rows(t, mask), t[[0, 2, 3]])
    on_device = select_rows(torch.empty(6, 2, device="meta"), mask)  # the index_select path (no values on meta)
    assert on_device.device.type == "meta" and on_device.shape == (3, 2)


def test_fsdp2_in_bf16_keeps_batchnorm_and_the_supervised_head_in_fp32():
    """FSDP2 with bf16 parameters (each GPU of a multi-GPU run), here over one gloo rank: heads with
    BatchNorm run (bf16 weights against fp32 running statistics would fail), the DINO head's linear
    layers compute in bf16, and the supervised head and every loss term in fp32, as on one worker."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from hierdino.train.parallel import apply_fsdp

    cfg = load_config("tiny-cpu", ["model.arch=vit_micro_cpu", "optim.warmup_steps=0", "optim.freeze_last_layer_steps=0"])
    assert cfg.model.dino_head.batchnorm
    torch.manual_seed(0)
    m = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
    dtypes = {}

    def record(name):
        def hook(mod, inputs, out):
            dtypes[name] = (inputs[0].dtype, out.dtype)
        return hook

    m.student["dino_head"].mlp[0].register_forward_hook(record("dino_linear"))
    m.student["dino_head"].mlp[1].register_forward_hook(record("dino_batchnorm"))
    m.student["dino_head"].mlp[3].register_forward_hook(record("dino_linear_after_batchnorm"))
    m.sup_head.register_forward_hook(record("sup_head"))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        apply_fsdp(m, init_device_mesh("cpu", (1,)), torch.bfloat16, torch.float32)
        step, gen = TrainStep(m, cfg), torch.Generator().manual_seed(0)
        outs = [step(make_step_batch(_synthetic_raw(8), cfg, gen, torch.device("cpu"), 8), i) for i in range(2)]
    finally:
        dist.destroy_process_group()
    assert dtypes["dino_linear"] == dtypes["dino_linear_after_batchnorm"] == (torch.bfloat16, torch.bfloat16)
    assert dtypes["dino_batchnorm"][0] == torch.float32 and dtypes["sup_head"] == (torch.float32, torch.float32)
    assert all(math.isfinite(o[k]) for o in outs for k in ("dino", "ibot", "sup"))
    running = m.student["dino_head"].mlp[1].running_mean
    assert running.dtype == torch.float32 and running.abs().sum() > 0  # the statistics moved


def test_fsdp2_over_one_rank_trains_as_the_plain_model():
    """FSDP2 over one rank (the student keeping its gathered parameters through the step, the teacher
    resharding after each forward) gives the unsharded model's losses and EMA teacher step for step;
    ``param_checksum`` all-reduces the shards on their device."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from hierdino.train.parallel import apply_fsdp, local_param_fraction, param_checksum

    cfg = load_config("tiny-cpu", ["model.arch=vit_micro_cpu", "optim.warmup_steps=0", "optim.freeze_last_layer_steps=0"])
    raw = _synthetic_raw(8)

    def run(fsdp: bool):
        torch.manual_seed(0)
        m = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
        if fsdp:
            apply_fsdp(m, init_device_mesh("cpu", (1,)))
        step, gen = TrainStep(m, cfg), torch.Generator().manual_seed(0)
        losses = [step(make_step_batch(raw, cfg, gen, torch.device("cpu"), 8), i)["loss"] for i in range(3)]
        return m, losses, param_checksum(m.teacher)

    plain, plain_losses, plain_sum = run(False)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded, losses, checksum = run(True)
        assert any(hasattr(p, "to_local") for p in sharded.student.parameters())  # really sharded
        assert local_param_fraction(sharded.student) == 1.0
    finally:
        dist.destroy_process_group()
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    assert plain_losses[2] < plain_losses[0]  # it trained: the teachers below moved the same way
    assert checksum == pytest.approx(plain_sum, rel=1e-9)
    assert checksum != pytest.approx(param_checksum(StudentTeacher(cfg, load_hierarchy("wbc-h1")).teacher), rel=1e-9)


def _varying_raws(steps: int, n: int = 8) -> list[dict]:
    """Batches of the same images whose labelled rows change every step (the masks change by themselves)."""
    base, rng = _synthetic_raw(n), np.random.default_rng(0)
    raws = []
    for _ in range(steps):
        raw = dict(base, label=base["label"].clone())
        raw["label"][torch.from_numpy(rng.random(n) < 0.5)] = -1
        raws.append(raw)
    return raws


def test_train_compile_compiles_the_whole_step_once_for_20_steps_of_changing_batches(said):
    """``train.compile`` on one worker: ``torch.compile(step_losses, fullgraph=True, dynamic=False)`` (here
    with AOTAutograd's eager backend: inductor's code generation takes minutes on a CPU). Over 20 steps
    whose masked-patch and labelled counts and teacher temperature change, it compiles one graph, once
    (dynamo's counters; any recompile after the first step raises), and gives the eager step's losses
    and weights."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from hierdino.train.loop import compile_model
    from hierdino.train.parallel import param_checksum

    cfg = load_config("tiny-cpu", ["model.arch=vit_micro_cpu", "optim.warmup_steps=0", "optim.freeze_last_layer_steps=0",
                                   "loss.centering=sinkhorn", "data.supervised_view=separate", "data.local_crops_number=2",
                                   "loss.warmup_teacher_temp=0.02", "loss.warmup_teacher_temp_steps=100",
                                   "loss.koleo_weight=0.1"])
    raws = _varying_raws(20)
    torch._dynamo.reset()
    counters.clear()
    runs, models, counts = {}, {}, set()
    for compiled in (False, True):
        torch.manual_seed(0)
        models[compiled] = m = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
        if compiled:
            compile_model(m, backend="aot_eager")
        step, gen, records = TrainStep(m, cfg), torch.Generator().manual_seed(0), []
        for i, raw in enumerate(raws):
            batch = make_step_batch(raw, cfg, gen, torch.device("cpu"), 8)
            counts.add((int(batch.mask_weight.sum()), int((batch.labels >= 0).sum())))
            if compiled and i == 1:  # from here on, anything that would compile again raises
                torch.compiler.set_stance("fail_on_recompile")
            try:
                records.append(step(batch, 5 * i))
            finally:
                torch.compiler.set_stance("default")
        runs[compiled] = records
    assert len({c[0] for c in counts}) > 5 and len({c[1] for c in counts}) > 3  # the contents did change
    assert len({r["teacher_temp"] for r in runs[False]}) == len(raws)
    assert counters["stats"]["unique_graphs"] == 1 and counters["aot_autograd"]["total"] == 1
    assert sum("train.compile (step): the first step compiled in" in line for line in said) == 1
    for e, c in zip(runs[False], runs[True]):
        for k in ("loss", "dino", "ibot", "koleo", "sup"):
            assert c[k] == pytest.approx(e[k], rel=1e-5), k
    assert param_checksum(models[True].student) == pytest.approx(param_checksum(models[False].student), rel=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("overrides", [[], ["loss.centering=sinkhorn", "model.ibot_separate_head=false"]])
def test_padded_masked_patches_leave_the_seeded_default_step_for_step(overrides):
    """The embedded default (tiny-cpu: BatchNorm heads, EMA centres) trained on fixed-size buffers of
    masked patches gives, step for step, the losses and weights of the same steps on the masked patches
    alone (``mask_index=None``: gathered by ``nonzero``, as before the buffers)."""
    from hierdino.train.parallel import param_checksum

    cfg = load_config("tiny-cpu", overrides)  # its own schedules: at a large learning rate rounding grows faster
    raws, runs, models = _varying_raws(5), {}, {}
    for padded in (True, False):
        torch.manual_seed(0)
        models[padded] = m = StudentTeacher(cfg, load_hierarchy("wbc-h1"))
        step, gen = TrainStep(m, cfg), torch.Generator().manual_seed(0)
        runs[padded] = []
        for i, raw in enumerate(raws):
            batch = make_step_batch(raw, cfg, gen, torch.device("cpu"), 8)
            assert batch.mask_weight.sum() < len(batch.mask_weight)  # some padding
            runs[padded].append(step(batch if padded else replace(batch, mask_index=None, mask_weight=None), i))
    for p, u in zip(runs[True], runs[False]):
        for k in ("loss", "dino", "ibot", "sup"):
            assert p[k] == pytest.approx(u[k], rel=1e-5), k
    assert param_checksum(models[True].teacher) == pytest.approx(param_checksum(models[False].teacher), rel=1e-6)
