"""Typed run configuration: dataclasses, packaged YAML presets, ``--set a.b=c`` overrides, validation.

``load_config("tiny-cpu", ["train.steps=50"])`` merges, in order: the dataclass defaults, the
preset (or a YAML file), then the overrides, and checks everything before any cluster work starts.
Every error names the key and the value. Step-based schedules replace DINOv2's epochs because
data is streamed; ``optim.epoch_steps`` says how many steps make an "epoch" where one is needed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from hierdino.data.suite import EXTERNAL_SETS


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names the key and value."""


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
    global_crops_scale: list[float] = _f(factory=lambda: [0.32, 1.0], doc="random-resized-crop area range")
    local_crops_number: int = _f(8, min=0, doc="local crops per image (0 disables them)")
    local_crops_size: int = _f(96, min=8)
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
    layerscale_init: float = _f(1e-5, gt=0.0)
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
    compile: bool = _f(False, doc="torch.compile each transformer block of student and teacher (GPU runs; "
                                  "the first steps are slower while it compiles)")
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
    probe: Literal["knn1", "knn20", "logreg"] = _f("knn20", doc="probe whose bAcc is the sweep objective")
    image_size: Optional[int] = _f(None, min=8, doc="evaluation image size; default: data.image_size")
    batch_size: int = _f(128, min=1)
    bootstrap: int = _f(1000, min=10)
    at_end: bool = _f(True)


@dataclass
class RunConfig:
    storage: str = _f("./runs", doc="local path or s3:// URI holding run directories")
    name: str = _f("hierdino", doc="run directory name; the same name resumes")
    resume: bool = _f(True, doc="continue the run of the same name from its last complete checkpoint (its config "
                                "must match, see hierdino.train.resume); false: a fresh run in a new directory <name>-2, -3, ...")
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


# -- conversion and checks ------------------------------------------------------------------------

def _unwrap_optional(tp) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(key: str, value: Any, tp) -> Any:
    tp, optional = _unwrap_optional(tp)
    if typing.get_origin(tp) is Literal and value in typing.get_args(tp):  # e.g. kind "none" is a value, not null
        return value
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~") and (optional or tp is not str)):
        if optional:
            return None
        raise ConfigError(f"{key}: value is required, got null")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_convert(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this module


def _check_range(key: str, value: Any, meta: dict) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if meta.get("min") is not None and v < meta["min"]:
            raise ConfigError(f"{key}: {v!r} is out of range: must be >= {meta['min']}")
        if meta.get("max") is not None and v > meta["max"]:
            raise ConfigError(f"{key}: {v!r} is out of range: must be <= {meta['max']}")
        if meta.get("gt") is not None and v <= meta["gt"]:
            raise ConfigError(f"{key}: {v!r} is out of range: must be > {meta['gt']}")


def _unknown_key(prefix: str, key: str, known: list[str]) -> ConfigError:
    full = f"{prefix}{key}"
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {full!r}{hint} (known under {prefix.rstrip('.') or 'top level'}: {', '.join(known)})")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise _unknown_key(prefix, str(key), list(fields))
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name] if data[name] is not None else {}, key + ".")
        else:
            kwargs[name] = _convert(key, data[name], tp)
            if kwargs[name] is not None:
                _check_range(key, kwargs[name], f.metadata)
    return cls(**kwargs)


def _set_dotted(raw: dict, dotted: str, value: str) -> None:
    parts = dotted.split(".")
    cls = Config
    node = raw
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        prefix = ".".join(parts[:i]) + ("." if i else "")
        if part not in fields:
            raise _unknown_key(prefix, part, list(fields))
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{dotted}: is a section; set one of its keys, e.g. {dotted}.{dataclasses.fields(tp)[0].name}=...")
            node[part] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section (in override {dotted!r})")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        cls = tp


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def override_text(value: Any) -> str:
    """A value as ``key=value`` override text that loading converts back (``null``, ``[a,b]``, scalars)."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    return str(value)


def preset_overrides(preset_or_path: str | Path) -> list[str]:
    """A (partial) preset or YAML file as ``key.sub=value`` overrides, to lay over another config."""
    data, _ = _resolve(preset_or_path)
    out: list[str] = []

    def walk(prefix: str, node: dict) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                out.append(f"{prefix}{key}={override_text(value)}")

    walk("", data)
    return out


def config_diff(base: Config, cfg: Config) -> list[str]:
    """``key: base -> cfg`` for every leaf key whose value differs (the start block's "changed" list)."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(base.to_dict()), flat(cfg.to_dict())
    return [f"{k}: {override_text(a[k])} -> {override_text(b[k])}" for k in b if a.get(k) != b[k]]


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("hierdino.configs").iterdir() if p.name.endswith(".yaml"))


def _read_source(preset_or_path: str | Path) -> tuple[dict, str]:
    path = Path(str(preset_or_path)).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():  # a directory named like a preset (a run) is not a config
        if not path.is_file():
            raise ConfigError(f"config file {preset_or_path} does not exist")
        text, source = path.read_text(), str(path)
    else:
        res = resources.files("hierdino.configs") / f"{preset_or_path}.yaml"
        if not res.is_file():
            close = difflib.get_close_matches(str(preset_or_path), list_presets(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown preset {preset_or_path!r}{hint} (presets: {', '.join(list_presets())}; or give a .yaml path)")
        text, source = res.read_text(), f"preset {preset_or_path}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    return data, source


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _resolve(preset_or_path: str | Path, seen: tuple = ()) -> tuple[dict, str]:
    """Read a preset or file, following an optional ``inherit: <preset or path>`` key."""
    data, source = _read_source(preset_or_path)
    parent = data.pop("inherit", None)
    if parent is not None:
        if str(parent) in seen:
            raise ConfigError(f"{source}: 'inherit' cycle through {parent!r}")
        base, _ = _resolve(parent, seen + (str(preset_or_path),))
        data = _merge(base, data)
    return data, source


def validate(cfg: Config) -> None:
    """Checks across keys, each naming the keys involved."""
    from hierdino.hierarchy import load_hierarchy

    try:
        h = load_hierarchy(cfg.hierarchy.name)
    except Exception as e:
        raise ConfigError(f"hierarchy.name: {cfg.hierarchy.name!r}: {e}") from None
    sup = cfg.loss.supervised
    if sup.level_weights is not None:
        if sup.alpha is not None:
            raise ConfigError(
                f"loss.supervised.alpha={sup.alpha} and loss.supervised.level_weights={sup.level_weights} are both set; "
                "set alpha=null to use level weights"
            )
        if len(sup.level_weights) != h.max_depth:
            raise ConfigError(
                f"loss.supervised.level_weights: {sup.level_weights} has {len(sup.level_weights)} entries, "
                f"hierarchy {h.name!r} has {h.max_depth} levels"
            )
        if sum(sup.level_weights) <= 0:
            raise ConfigError(f"loss.supervised.level_weights: {sup.level_weights} must not be all zero")
    for key in ("data.global_crops_scale", "data.local_crops_scale", "data.mask_ratio"):
        lo_hi = cfg.get(key)
        if len(lo_hi) != 2 or not (0 <= lo_hi[0] <= lo_hi[1] <= 1):
            raise ConfigError(f"{key}: {lo_hi} must be [low, high] with 0 <= low <= high <= 1")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: {cfg.optim.betas} must be two numbers in [0, 1)")
    if cfg.data.weights is not None and len(cfg.data.weights) != len(cfg.data.train):
        raise ConfigError(f"data.weights: {cfg.data.weights} needs one weight per data.train entry ({len(cfg.data.train)})")
    if cfg.train.batch_size % cfg.scaling.num_workers:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is not divisible by scaling.num_workers={cfg.scaling.num_workers}"
        )
    if cfg.data.local_crops_size > cfg.data.image_size:
        raise ConfigError(f"data.local_crops_size={cfg.data.local_crops_size} exceeds data.image_size={cfg.data.image_size}")
    if cfg.train.stop_at_step is not None and cfg.train.stop_at_step > cfg.train.steps:
        raise ConfigError(f"train.stop_at_step={cfg.train.stop_at_step} exceeds train.steps={cfg.train.steps}")
    if not cfg.run.name or "/" in cfg.run.name:
        raise ConfigError(f"run.name: {cfg.run.name!r} must be a non-empty name without '/'")
    if cfg.optim.momentum_teacher > cfg.optim.momentum_teacher_end:
        raise ConfigError(
            f"optim.momentum_teacher={cfg.optim.momentum_teacher} exceeds optim.momentum_teacher_end={cfg.optim.momentum_teacher_end}"
        )


def load_config(preset_or_path: str | Path = "tiny-cpu", overrides: list[str] | dict | None = None) -> Config:
    """Defaults <- preset or YAML file <- overrides (``["a.b=c", ...]`` or ``{"a.b": value}``), validated."""
    raw, _ = _resolve(preset_or_path)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        _set_dotted(raw, key, value)
    cfg = _build(Config, raw)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    validate(cfg)
    return cfg
