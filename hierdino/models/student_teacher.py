"""The SSL meta-architecture: one training step's maths for student, teacher and supervised head.

Student = backbone + DINO head + iBOT head (+ supervised linear head on its CLS token); teacher =
the same backbone and heads as an EMA of the student, with no supervised head. ``losses`` takes a
device batch already augmented and normalised and returns the weighted total and each term.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from hierdino.hierarchy import Hierarchy
from hierdino.losses.collapse import distinct_argmax, entropy_ratio, feature_spread
from hierdino.losses.dino import TeacherCentering, dino_loss
from hierdino.losses.hierarchical import FlatCrossEntropy, build_supervised_loss
from hierdino.losses.ibot import ibot_patch_loss
from hierdino.losses.koleo import koleo_loss
from hierdino.models.backbone import Backbone, build_backbone, head_prototypes, load_pretrained
from hierdino.models.heads import DINOHead, SupervisedHead
from hierdino.models.weights import WeightsError, head_state, parse, read_object


@dataclass
class StepBatch:
    """One device batch. Crops are stacked crop-major: ``global_crops[2B]`` = crop 0 of every image, then crop 1."""

    global_crops: torch.Tensor          # [2B, 3, S, S] float, normalised
    local_crops: torch.Tensor | None    # [N*B, 3, s, s] or None
    masks: torch.Tensor                 # [2B, n_patches] bool
    labels: torch.Tensor                # [B] node indices, -1 = unlabelled
    sup_images: torch.Tensor | None     # [B, 3, S, S] supervised views (unlabelled images': zeros, out of the loss), or None
    mask_index: torch.Tensor | None = None  # [M_max] flat indices of the masked patches into [2B * n_patches], padded
    # to a size set by the config (hierdino.data.masking.padded_mask_index), computed on the host where the masks
    # are drawn (None: from ``masks``, with a length that depends on them and a device sync on GPUs)
    mask_weight: torch.Tensor | None = None  # [M_max] 1.0 for a masked patch, 0.0 for padding (None: no padding)

    def masked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(flat indices of the masked patches, the crop of each, their weights), in ``masks.nonzero()`` order."""
        index = self.mask_index if self.mask_index is not None else self.masks.flatten().nonzero().squeeze(1)
        return index, index // self.masks.shape[1], self.mask_weight if self.mask_index is not None else None


def _tower(cfg, backbone: Backbone) -> nn.ModuleDict:
    d, i = cfg.model.dino_head, cfg.model.ibot_head
    tower = nn.ModuleDict({
        "backbone": backbone,
        "dino_head": DINOHead(backbone.embed_dim, d.prototypes, d.hidden, d.bottleneck, d.layers, d.batchnorm),
    })
    if cfg.model.ibot_separate_head:
        tower["ibot_head"] = DINOHead(backbone.embed_dim, i.prototypes, i.hidden, i.bottleneck, i.layers, i.batchnorm)
    return tower


def collapse_stats(dino_targets: torch.Tensor, ibot_targets: torch.Tensor, student_cls: torch.Tensor,
                   labels: torch.Tensor) -> dict[str, float]:
    """The collapse monitor of one batch (``hierdino.losses.collapse``) and its labelled share."""
    return {
        "dino_entropy": entropy_ratio(dino_targets),
        "ibot_entropy": entropy_ratio(ibot_targets),
        "distinct_protos": float(distinct_argmax(dino_targets)),
        "cls_spread": feature_spread(student_cls),
        "labelled": float((labels >= 0).float().mean()) if labels.numel() else 0.0,
    }


class StudentTeacher(nn.Module):
    def __init__(self, cfg, hierarchy: Hierarchy, backbone: Backbone | None = None):
        super().__init__()
        self.cfg = cfg
        self.hierarchy = hierarchy
        backbone = backbone or build_backbone(cfg.model.arch, cfg.data.image_size, cfg.model.drop_path_rate,
                                              cfg.model.layerscale_init, cfg.model.drop_path_uniform)
        self.student = _tower(cfg, backbone)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        # The teacher never drops paths.
        for m in self.teacher.modules():
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0
        sup = cfg.loss.supervised
        self.sup_loss = build_supervised_loss(sup.kind, hierarchy, sup.alpha, sup.level_weights, sup.normalize)
        if self.sup_loss is not None:  # labels come from the ingest's label map, checked before the run
            self.sup_loss.check_targets = False
        self.sup_head = SupervisedHead(backbone.embed_dim, hierarchy.num_leaves) if self.sup_loss is not None else None
        ibot_k = (cfg.model.ibot_head if cfg.model.ibot_separate_head else cfg.model.dino_head).prototypes
        self.dino_center = TeacherCentering(cfg.model.dino_head.prototypes, cfg.loss.centering, cfg.loss.center_momentum)
        self.ibot_center = TeacherCentering(ibot_k, cfg.loss.centering, cfg.loss.center_momentum)
        self.patch_size = backbone.patch_size
        # The maths over [rows, prototypes] tensors: teacher targets (centring or Sinkhorn-Knopp) and the
        # student's cross-entropies. Memory-bound on a GPU (each eager op one pass over 65,536
        # prototypes per row); ``compile_losses`` swaps in compiled versions that fuse them (several
        # workers; on one, ``train.compile`` compiles the whole ``step_losses``).
        self.dino_targets, self.ibot_targets = self.dino_center.targets, self.ibot_center.targets
        self.dino_loss, self.ibot_loss = dino_loss, ibot_patch_loss
        self.autocast = False  # bf16 autocast of backbones and DINO/iBOT heads: set by the trainer for bf16 on one
        # worker (FSDP2 casts the parameters themselves on several)
        self.compiled: str | None = None  # train.compile: "step", "graphs" (CUDA graphs) or "blocks" (compile_model)

    def compile_losses(self) -> None:
        """``torch.compile`` the teacher targets and the DINO / iBOT losses (forward and backward): each
        becomes a few fused kernels instead of one pass over its [rows, prototypes] tensor per
        operation. Every shape is fixed by the config and the teacher temperature is a tensor: one
        compilation serves the whole run."""
        for name in ("dino_targets", "ibot_targets", "dino_loss", "ibot_loss"):
            setattr(self, name, torch.compile(getattr(self, name), dynamic=False))

    def ibot_head(self, tower: nn.ModuleDict) -> nn.Module:
        return tower["ibot_head"] if "ibot_head" in tower else tower["dino_head"]

    def _encode(self, tower: nn.ModuleDict, images: torch.Tensor, masks: torch.Tensor | None = None):
        """Backbone forward, under bf16 autocast when ``autocast`` is set (single-process bf16)."""
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return tower["backbone"](images, masks)

    def _logits(self, head: nn.Module, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """A DINO / iBOT head's prototype logits, in fp32 for the targets and losses: its matmuls run in
        bf16 under ``autocast`` (one worker) or on bf16 parameters (FSDP2), in fp32 otherwise. ``valid``:
        the real rows of a padded buffer (the head's BatchNorm, if any, normalises over them alone)."""
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return (head(x) if valid is None else head(x, valid)).float()

    def losses(self, batch: StepBatch, teacher_temp: float,
               monitor: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
        """Weighted total, each term, and (with ``monitor``) the collapse statistics of this batch.

        The maths is ``step_losses``, whose every shape is fixed by the config (the whole of it is
        compiled as one graph with ``train.compile``); the statistics read values back, outside it.
        """
        mask_index, crop_of_patch, mask_weight = batch.masked()
        # The temperature as a device scalar (a fill, no host copy): a compiled step takes it as an input
        # instead of compiling again for each value of its warm-up schedule.
        temp = batch.global_crops.new_full((), teacher_temp, dtype=torch.float32)
        total, terms, (t_targets, t_patch_targets, s_cls) = self.step_losses(
            batch.global_crops, batch.local_crops, batch.masks, mask_index, crop_of_patch, mask_weight, batch.labels,
            batch.sup_images, temp)
        if not monitor:
            return total, terms, {}
        real = t_patch_targets if mask_weight is None else t_patch_targets[mask_weight > 0]
        return total, terms, collapse_stats(t_targets, real, s_cls, batch.labels)

    def step_losses(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None, masks: torch.Tensor,
                    mask_index: torch.Tensor, crop_of_patch: torch.Tensor, mask_weight: torch.Tensor | None,
                    labels: torch.Tensor, sup_images: torch.Tensor | None, teacher_temp: torch.Tensor):
        """``(total, terms, (teacher DINO targets, teacher iBOT targets, student global CLS))`` of one
        batch (``StepBatch``'s fields). No shape depends on the batch's content: the masked patches are
        a fixed-size buffer (``mask_index``, padding weighed 0 by ``mask_weight``), and the supervised
        views are one per image, the unlabelled (label -1) out of the loss's mean. In bf16 training the
        backbones and DINO / iBOT heads compute in bf16, their logits cast to fp32 before any softmax
        (targets, Sinkhorn-Knopp and losses in fp32: softmaxes over 65k prototypes lose too much in
        bf16); the supervised head (a few thousand multiply-adds per image) stays in fp32 on one worker."""
        lc = self.cfg.loss
        n_global = 2
        valid = None if mask_weight is None else mask_weight > 0  # the real rows of the masked-patch buffer
        # Named regions (torch.profiler): hierdino.bench.step prints the time of each.
        with record_function("teacher"), torch.no_grad():  # targets for the global crops and their masked patches
            t_cls, t_patch = self._encode(self.teacher, global_crops)
            t_logits = self._logits(self.teacher["dino_head"], t_cls)
            t_targets = self.dino_targets(t_logits, teacher_temp)
            t_patch_logits = self._logits(self.ibot_head(self.teacher), t_patch.flatten(0, 1).index_select(0, mask_index),
                                          valid)
            t_patch_targets = self.ibot_targets(t_patch_logits, teacher_temp, valid)
        # Every rank runs the same forwards (FSDP2 forwards are collectives), whatever its batch's labels and masks.
        with record_function("student_forward"):
            # The supervised views have the global crops' size: one forward for both (unmasked rows appended).
            n_crops = global_crops.shape[0]
            separate_sup = self.sup_head is not None and sup_images is not None
            images, student_masks = global_crops, masks
            if separate_sup:
                images = torch.cat([images, sup_images])
                student_masks = torch.cat([masks, masks.new_zeros(sup_images.shape[0], masks.shape[1])])
            cls, patch = self._encode(self.student, images, student_masks)
            s_cls, s_patch = cls[:n_crops].float(), patch[:n_crops]
            l_cls = None
            if local_crops is not None and lc.dino_local:
                l_cls = self._encode(self.student, local_crops)[0].float()
        with record_function("heads_losses"):
            terms: dict[str, torch.Tensor] = {}
            s_logits = list(self._logits(self.student["dino_head"], s_cls).chunk(n_global))
            if l_cls is not None:
                s_logits += list(self._logits(self.student["dino_head"], l_cls).chunk(self.cfg.data.local_crops_number))
            # The mean over all (teacher crop, other student crop) pairs: without local crops 1.5x DINOv2's
            # term (its sum / 3), kept on purpose (hierdino.losses.dino says why).
            terms["dino"] = self.dino_loss(s_logits, list(t_targets.chunk(n_global)), lc.student_temp)
            s_patch_logits = self._logits(self.ibot_head(self.student), s_patch.flatten(0, 1).index_select(0, mask_index),
                                          valid)
            terms["ibot"] = self.ibot_loss(s_patch_logits, t_patch_targets, masks, lc.student_temp, crop_of_patch,
                                           mask_weight)
            # DINOv2 sums KoLeo over the global crops (not a mean).
            terms["koleo"] = sum(koleo_loss(c) for c in s_cls.chunk(n_global)) if lc.koleo_weight > 0 else s_cls.sum() * 0.0
            if separate_sup:  # one view per image; the unlabelled ones (-1) are out of the mean
                terms["sup"] = self.sup_loss(self.sup_head(cls[n_crops:].float()), labels)
            elif self.sup_head is not None:  # reuse the global crops
                terms["sup"] = self.sup_loss(self.sup_head(s_cls), labels.repeat(n_global))
            total = lc.dino_weight * terms["dino"] + lc.ibot_weight * terms["ibot"] + lc.koleo_weight * terms["koleo"]
            if "sup" in terms:
                total = total + lc.supervised.weight * terms["sup"]
            with torch.no_grad():
                self.dino_center.update(t_logits)
                self.ibot_center.update(t_patch_logits, valid)
        return total, terms, (t_targets, t_patch_targets, s_cls)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher <- m * teacher + (1 - m) * student`` on local shards (FSDP2 DTensors included)."""
        t_params, s_params = [], []  # no detach: under no_grad nothing is recorded (a detach is one op per tensor)
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t_params.append(t.to_local() if hasattr(t, "to_local") else t)
            s_params.append(s.to_local() if hasattr(s, "to_local") else s)
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1 - momentum)

    def clip_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per student submodule, clipped separately as DINOv2 does (backbone, each head)."""
        groups = {name: list(m.parameters()) for name, m in self.student.items()}
        if self.sup_head is not None:
            groups["sup_head"] = list(self.sup_head.parameters())
        return groups

    def last_layers(self) -> list[nn.Module]:
        heads = [self.student["dino_head"]] + ([self.student["ibot_head"]] if "ibot_head" in self.student else [])
        return [h.last_layer for h in heads]

    def load_pretrained(self, uri: str, strict: bool = True, tower: str = "teacher", options=None) -> list[str]:
        """Start student and teacher from a checkpoint of any form (``hierdino.models.weights``).

        The backbone loads into both towers (strict: nothing left over, see ``load_pretrained``);
        DINO / iBOT heads load when the checkpoint has them (a DINOv2 checkpoint with one shared head
        gives it to both), and their shapes must match the configured heads. Returns report lines.
        """
        ckpt = parse(read_object(uri, options), uri, tower)
        lines = []
        for t in (self.student, self.teacher):
            report = load_pretrained(t["backbone"], ckpt, strict=strict)
        lines.append(f"init weights: {report}")
        if not ckpt.heads:
            lines.append("init weights: no DINO/iBOT heads in the checkpoint: random heads on a pretrained backbone "
                         "(train.freeze_backbone_steps lets them warm up first)")
            return lines
        for name in ("dino_head", "ibot_head"):
            if name not in self.student:
                continue
            found = name if name in ckpt.heads else "dino_head" if "dino_head" in ckpt.heads else None
            if found is None:
                lines.append(f"init weights: no {name} in the checkpoint: random")
                continue
            sd = head_state(ckpt.heads[found])
            own = self.student[name].state_dict()
            bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and own[k].shape != v.shape]
            left = sorted(set(own) ^ set(sd))
            if bad or left:
                msg = (f"{uri}: the checkpoint's {found} does not fit model.{name} (prototypes, bottleneck, hidden, "
                       f"layers, batchnorm): {'; '.join(bad[:4])} {'unmatched keys: ' + ', '.join(left[:8]) if left else ''}")
                if strict:
                    raise WeightsError(msg + "; configure the head as the checkpoint's, or set model.init_strict=false")
                lines.append(f"init weights: WARNING {msg}; {name} left random")
                continue
            for t in (self.student, self.teacher):
                t[name].load_state_dict(sd)
            lines.append(f"init weights: {name} from the checkpoint's {found} ({head_prototypes(sd)} prototypes)")
        return lines

    def ignored_internal_labels(self) -> int:
        return self.sup_loss.ignored_internal if isinstance(self.sup_loss, FlatCrossEntropy) else 0


def param_groups(model: StudentTeacher, layerwise_decay: float, patch_embed_lr_mult: float) -> list[dict]:
    """AdamW groups keyed by (lr multiplier, weight-decay multiplier, is prototype layer).

    LR multiplier: ``layerwise_decay ** (depth + 1 - layer_id)`` for backbone parameters (times
    ``patch_embed_lr_mult`` for the patch embedding), 1 for heads; no weight decay on biases,
    norms and LayerScale gammas (DINOv2's rule: tokens, position embeddings and prototype gains
    are decayed).
    """
    backbone: Backbone = model.student["backbone"]
    depth = len(backbone.blocks)
    last = {id(p) for layer in model.last_layers() for p in layer.parameters()}
    groups: dict[tuple, dict] = {}
    named = [(f"student.{n}", p) for n, p in model.student.named_parameters()]
    if model.sup_head is not None:
        named += [(f"sup_head.{n}", p) for n, p in model.sup_head.named_parameters()]
    for name, p in named:
        if not p.requires_grad:
            continue
        lr_mult = 1.0
        if name.startswith("student.backbone."):
            local = name.removeprefix("student.backbone.")
            lr_mult = layerwise_decay ** (depth + 1 - backbone.layer_id(local))
            if "patch_embed" in local:
                lr_mult *= patch_embed_lr_mult
        no_wd = p.ndim <= 1 or name.endswith(".bias") or "norm" in name or "gamma" in name  # DINOv2's rule
        key = (round(lr_mult, 8), 0.0 if no_wd else 1.0, id(p) in last)
        g = groups.setdefault(key, {"params": [], "lr_mult": key[0], "wd_mult": key[1], "last_layer": key[2]})
        g["params"].append(p)
    return list(groups.values())
