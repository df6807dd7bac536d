"""The run configuration's schema: one dataclass per section, each field with its default, range
and a one-line doc (``python -c "from hierdino.config import Config"`` to read it in code).

Step-based schedules replace DINOv2's epochs because data is streamed; ``optim.epoch_steps`` says
how many steps make an "epoch" where one is needed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from hierdino.errors import UserError

# The synthetic suite's external sets (built by hierdino.data.suite): eval.datasets' default.
EXTERNAL_SETS = ("synth-ext-1", "synth-ext-2", "synth-ood")


class ConfigError(UserError, ValueError):
    """A configuration value or key that cannot be used; the message names the key and value."""

    kind = "config"


def _f(default=dataclasses.MISSING, *, min=None, max=None, gt=None, doc="", factory=None):
    meta = {"min": min, "max": max, "gt": gt, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    train: list[str] = _f(factory=list, doc="dataset URIs (local, file:// or s3://); empty = the synthetic suite")
    weights: Optional[list[float]] = _f(None, doc="sampling weight per dataset in `train` (default: by size)")
    image_size: int = _f(224, min=16, doc="global crop size in pixels")
    center_crop: float = _f(1.0, gt=0.0, max=1.0, doc="share of each side of an image kept, centred, before any "
                            "crop (training and evaluation): single-cell fields (PBC, CellaVision) centre the cell")
    global_crops_scale: list[float] = _f(factory=lambda: [0.32, 1.0], doc="random-resized-crop area range")
    color_jitter: list[float] = _f(factory=lambda: [0.4, 0.4, 0.2, 0.1], doc="colour jitter of the SSL views (p=0.8): "
                                   "brightness, contrast, saturation, hue bounds (DINOv2); the supervised view never "
                                   "shifts hue")
    grayscale_p: float = _f(0.2, min=0.0, max=1.0, doc="probability that an SSL view is made grey (DINOv2: 0.2)")
    local_crops_number: int = _f(8, min=0, doc="local crops per image (0 disables them)")
    local_crops_size: int = _f(98, min=8, doc="local crop size in pixels (a multiple of the patch size: 98 = 7 x 14)")
    local_crops_scale: list[float] = _f(factory=lambda: [0.05, 0.32])
    supervised_view: Literal["separate", "global"] = _f("separate", doc="supervised loss on its own mild view or the global crops")
    mask_sample_prob: float = _f(0.5, min=0.0, max=1.0, doc="fraction of global crops that get an iBOT mask")
    mask_ratio: list[float] = _f(factory=lambda: [0.1, 0.5], doc="iBOT masked-patch ratio range")
    max_corrupt_fraction: float = _f(0.01, min=0.0, max=1.0, doc="fail when more images than this are undecodable")
    shuffle_seed: int = _f(0)
    synth_cache: str = _f("~/.cache/hierdino/synth", doc="where the embedded default builds the synthetic suite")
    s3_endpoint: Optional[str] = _f(None, doc="S3 endpoint URL (default: AWS or $AWS_ENDPOINT_URL)")
    s3_region: Optional[str] = _f(None)
    num_cpus_per_map: float = _f(1.0, gt=0.0, doc="CPUs reserved by each Ray Data decode/crop task")
    jpeg_draft: bool = _f(True, doc="decode a JPEG at 1/2, 1/4 or 1/8 of its size when every crop of it downsamples "
                                    "that much (DCT scaling); false: always full size")
    decode: Literal["cpu", "device"] = _f("cpu", doc="where images are decoded and cropped: 'cpu' (Ray Data tasks) or "
                                                      "'device' (the training worker: nvJPEG on a GPU; the tasks only "
                                                      "plan the crops and ship the encoded bytes)")


@dataclass
class HeadConfig:
    prototypes: int = _f(65536, min=2)
    bottleneck: int = _f(256, min=2)
    hidden: int = _f(2048, min=2)
    layers: int = _f(3, min=1)
    batchnorm: bool = _f(False, doc="BatchNorm after each hidden layer (DINO's use_bn_in_head); helps from-scratch short runs")


@dataclass
class ModelConfig:
    arch: str = _f("vit_small_patch14_dinov2", doc="timm ViT name, or `vit_tiny_cpu`")
    init_weights: Optional[str] = _f(None, doc="path or s3:// URI of DINOv2 / DinoBloom / timm weights (any form; "
                                      "check a file with `python -m hierdino.models.backbone check <weights>`)")
    init_strict: bool = _f(True, doc="refuse init_weights that leave a backbone tensor unloaded or unused; "
                                     "false: go on with a warning naming them")
    init_tower: Literal["teacher", "student"] = _f("teacher", doc="which tower of a DINOv2 / DinoBloom training checkpoint to start from")
    drop_path_rate: float = _f(0.3, min=0.0, max=1.0)
    drop_path_uniform: bool = _f(True, doc="every block drops paths at drop_path_rate (DINOv2); false: linear 0 -> rate")
    layerscale_init: Optional[float] = _f(1e-5, gt=0.0, doc="LayerScale initial value (DINOv2: 1e-5); null: no "
                                          "LayerScale, for plain ViT weights (timm's vit_*_224 models)")
    dino_head: HeadConfig = _f(factory=HeadConfig)
    ibot_head: HeadConfig = _f(factory=HeadConfig)
    ibot_separate_head: bool = _f(True)


@dataclass
class HierarchyConfig:
    name: str = _f("wbc-h1", doc="packaged hierarchy name or YAML path")


@dataclass
class SupervisedLossConfig:
    kind: Literal["hxe", "flat", "none"] = _f("hxe")
    weight: float = _f(0.5, min=0.0)
    alpha: Optional[float] = _f(0.5, min=0.0, doc="w[d] = exp(-alpha*d); null when level_weights are given")
    level_weights: Optional[list[float]] = _f(None, doc="one weight per hierarchy level [w1..wD]")
    normalize: Literal["none", "tree", "path"] = _f(
        "tree", doc="'tree': edge weights / their sum over the tree (Bertinetto, the paper); 'path': scaled so the mean "
                    "over leaves of the average edge weight on the root-to-leaf path is 1 (the scale of flat CE)")


@dataclass
class LossConfig:
    dino_weight: float = _f(0.5, min=0.0)
    dino_local: bool = _f(True, doc="also the global-local DINO pairs (needs local crops)")
    ibot_weight: float = _f(1.0, min=0.0)
    koleo_weight: float = _f(0.0, min=0.0)
    student_temp: float = _f(0.1, gt=0.0)
    teacher_temp: float = _f(0.07, gt=0.0)
    warmup_teacher_temp: float = _f(0.04, gt=0.0)
    warmup_teacher_temp_steps: int = _f(37500, min=0)
    centering: Literal["ema", "sinkhorn"] = _f("sinkhorn")
    center_momentum: float = _f(0.9, min=0.0, max=1.0)
    supervised: SupervisedLossConfig = _f(factory=SupervisedLossConfig)


@dataclass
class OptimConfig:
    base_lr: float = _f(0.004, gt=0.0, doc="LR per 1024 images; scaled by sqrt(batch/1024)")
    min_lr: float = _f(1e-6, min=0.0)
    warmup_steps: int = _f(12500, min=0)
    weight_decay: float = _f(0.04, min=0.0)
    weight_decay_end: float = _f(0.4, min=0.0)
    betas: list[float] = _f(factory=lambda: [0.9, 0.999])
    clip_grad: float = _f(3.0, min=0.0, doc="0 disables clipping")
    layerwise_decay: float = _f(0.9, gt=0.0, max=1.0)
    patch_embed_lr_mult: float = _f(0.2, min=0.0)
    freeze_last_layer_steps: int = _f(1250, min=0, doc="DINO head last layer frozen (DINOv2: 1 epoch)")
    momentum_teacher: float = _f(0.992, min=0.0, max=1.0)
    momentum_teacher_end: float = _f(1.0, min=0.0, max=1.0)


@dataclass
class TrainConfig:
    steps: int = _f(125000, min=1)
    batch_size: int = _f(1024, min=1, doc="global batch size (all workers)")
    seed: int = _f(0)
    log_every: int = _f(10, min=1)
    precision: Literal["auto", "bf16", "fp32"] = _f("auto", doc="auto: bf16 params on GPU, fp32 on CPU")
    stop_at_step: Optional[int] = _f(None, min=1, doc="stop early (schedules still span `steps`); for tests and resume")
    skip_nonfinite_steps: int = _f(0, min=0, doc="steps with a non-finite loss or gradient that may be skipped "
                                   "(a warning each) before the run stops with an error naming the step")
    compile: bool = _f(False, doc="torch.compile the whole step (teacher, student, heads, losses, and their "
                                  "backward) as one graph of fixed shapes, compiled once (fullgraph, dynamic=False), "
                                  "with CUDA graphs on a GPU (mode reduce-overhead); with several workers (FSDP2) each "
                                  "transformer block and the targets and losses instead. The first step is slower "
                                  "while it compiles (its time is printed)")
    freeze_backbone_steps: int = _f(0, min=0, doc="the backbone stays fixed for the first N steps while the "
                                    "heads warm up (for pretrained weights without DINO/iBOT heads)")
    stop_on_collapse: bool = _f(False, doc="stop with an error when the DINO targets stay near uniform after warm-up")


@dataclass
class ScalingConfig:
    num_workers: int = _f(1, min=1)
    use_gpu: bool = _f(True)
    cpus_per_worker: float = _f(1.0, gt=0.0)
    gpus_per_worker: float = _f(1.0, gt=0.0, max=1.0, doc="with use_gpu: a fraction (0.25, 0.5) lets several small "
                                                        "runs (sweep trials) share a GPU")
    max_failures: int = _f(3, min=-1, doc="worker restarts from the last checkpoint; -1 = unlimited")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = _f("PACK", doc="SPREAD puts workers on different nodes")
    wait_for_resources_s: float = _f(0.0, min=0.0, doc="an autoscaling cluster (KubeRay, `ray up`): wait this long "
                                     "for the CPUs/GPUs the run needs before giving up (0: fail at once)")


@dataclass
class CheckpointConfig:
    every_steps: int = _f(1000, min=1)
    keep: int = _f(3, min=1, doc="complete checkpoints kept; older ones are deleted after a newer one is committed")


@dataclass
class EvalConfig:
    datasets: list[str] = _f(factory=lambda: list(EXTERNAL_SETS))
    every_steps: int = _f(0, min=0, doc="periodic evaluation during training; 0 = only at the end")
    split: Literal["val", "test"] = _f("val")
    probe: Literal["knn1", "knn20", "logreg", "logreg_raw"] = _f("knn20", doc="probe whose bAcc is the sweep objective: "
                                                                  "logreg standardises the features and chooses C "
                                                                  "(hierdino.eval.probes), logreg_raw is the paper's")
    image_size: Optional[int] = _f(None, min=8, doc="evaluation image size; default: data.image_size")
    center_crop: Optional[float] = _f(None, gt=0.0, max=1.0, doc="share of each side kept, centred, before the "
                                      "resize; default: data.center_crop")
    batch_size: int = _f(128, min=1)
    bootstrap: int = _f(1000, min=10)
    at_end: bool = _f(True)
    features: Literal["auto", "ray", "local"] = _f("auto", doc="where the end-of-run evaluation computes features: "
                                                   "'ray' (a Ray Data actor pool, on the cluster's GPUs), 'local' "
                                                   "(the driver process), 'auto' (local on a one-node cluster "
                                                   "without GPUs, else ray)")


@dataclass
class RunConfig:
    storage: str = _f("./runs", doc="local path or s3:// URI holding run directories")
    name: str = _f("hierdino", doc="run directory name; the same name resumes")
    resume: bool = _f(True, doc="continue the run of the same name from its last complete checkpoint (its config "
                                "must match, except the keys marked on resume: yes); false: a fresh run in a new "
                                "directory <name>-2, -3, ...")
    storage_retry_s: float = _f(180.0, min=0.0, doc="how long reads and writes retry an object store that stops "
                                "answering before the run stops with an error")


@dataclass
class Config:
    data: DataConfig = _f(factory=DataConfig)
    model: ModelConfig = _f(factory=ModelConfig)
    hierarchy: HierarchyConfig = _f(factory=HierarchyConfig)
    loss: LossConfig = _f(factory=LossConfig)
    optim: OptimConfig = _f(factory=OptimConfig)
    train: TrainConfig = _f(factory=TrainConfig)
    scaling: ScalingConfig = _f(factory=ScalingConfig)
    checkpoint: CheckpointConfig = _f(factory=CheckpointConfig)
    eval: EvalConfig = _f(factory=EvalConfig)
    run: RunConfig = _f(factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def get(self, dotted: str) -> Any:
        obj: Any = self
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj
