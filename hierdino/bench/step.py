"""Benchmark: the full training step against a bare step of the same model and batch, MFU, and
the overhead of 2 Ray Train workers (FSDP2), all in one run.

- full step: teacher forward, student forward/backward with DINO + iBOT + KoLeo + supervised
  losses, device augmentation and masks, AdamW, EMA (``hierdino.train.loop.TrainStep``);
- bare step: the student backbone alone on the same global crops, a linear head and
  cross-entropy, AdamW; single process;
- MFU: FLOPs of one full step (``torch.utils.flop_counter``) per second, against the measured
  peak of a large matmul on the same device in the same dtype; the same for the bare step, and the
  FLOP ratio of the two (the full/bare time ratio a step as efficient as the bare one would have);
- Ray overhead: step time with 2 workers (FSDP2, each with half the batch) over the
  single-process full step (CPU only; on one GPU the multi-worker part is skipped).
- compiled: the full step with ``train.compile`` (the whole step as one graph,
  ``hierdino.train.loop.compile_model``; under ``--fsdp`` compiled blocks), and on a GPU also with
  CUDA graphs (``mode="reduce-overhead"``), each timed in the same process as the eager step and
  given as a ratio to it (``--no-compile`` skips them: minutes of compilation on a CPU).

- breakdown: the time of each named part of the full step (augmentation, teacher, student
  forwards, heads + losses, backward, clipping + optimizer, EMA) from ``torch.profiler``; on a GPU
  also its busy time (kernels and copies) against the unprofiled step time, and on any device the
  ATen operations one step dispatches (the host's work: a GPU step waits for the host when that
  work outlasts the kernels).

  python -m hierdino.bench.step [--config tiny-cpu] [--steps 10] [--batch 32] [--no-ray] [--no-compile]
  python -m hierdino.bench.step --config vits14 --batch 64     # on a GPU, bf16
  python -m hierdino.bench.step --config vitl14 --batch 64 --fsdp   # the full step as each GPU of a multi-GPU run
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.autograd import DeviceType
from torch.distributed.device_mesh import init_device_mesh
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from hierdino import logs
from hierdino.config import config_from_dict, load_config
from hierdino.data.augment import to_model_input
from hierdino.hierarchy import load_hierarchy
from hierdino.train.parallel import apply_fsdp, param_dtype_for, use_tensor_cores


def _raw_batch(cfg, batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s, ls, n = cfg.data.image_size, cfg.data.local_crops_size, cfg.data.local_crops_number
    raw = {"global": torch.randint(0, 256, (batch, 2, s, s, 3), generator=g, dtype=torch.uint8),
           "label": torch.randint(-1, 20, (batch,), generator=g), "ok": torch.ones(batch, dtype=torch.bool)}
    if n:
        raw["local"] = torch.randint(0, 256, (batch, n, ls, ls, 3), generator=g, dtype=torch.uint8)
    if cfg.loss.supervised.kind != "none" and cfg.data.supervised_view == "separate":
        raw["sup"] = torch.randint(0, 256, (batch, s, s, 3), generator=g, dtype=torch.uint8)
    return raw


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, mib: int = 1024, reps: int = 10) -> float:
    """Bytes per second read and written by a large tensor copy on ``device`` (1 GiB; the memory-bound
    operations' ceiling)."""
    a = torch.empty(mib * 2 ** 18, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    _sync(device)
    return 2 * a.numel() * a.element_size() * reps / (time.perf_counter() - t0)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 10) -> float:
    """FLOP/s of an n x n x n matmul: n = 8192 on a GPU (small products do not reach its peak), 2048 on CPU."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def full_step(cfg, batch: int, device: torch.device, dtype: torch.dtype, fsdp: bool = False, mode: str = "eager"):
    """The trainer's step on one synthetic batch: ``(step_fn, next_batch)``, where
    ``step_fn(next_batch(), step, sync=...)`` runs one full training step; ``mode``: "eager",
    "compiled" (``compile_model``, without CUDA graphs) or "graphs" (with them).

    As the trainer on one worker: bf16 autocast of the backbone and head forwards (logits, targets and
    losses fp32); with ``fsdp``, as on several: FSDP2 (here over one rank) with ``dtype`` parameters.
    """
    import torch.distributed as dist

    from hierdino.models.student_teacher import (
        StudentTeacher,  # heavy (timm): not for --help or a config error
    )
    from hierdino.train.loop import (  # heavy (Ray Train, timm), likewise
        TrainStep,
        compile_model,
        make_step_batch,
    )

    torch.manual_seed(0)
    model = StudentTeacher(cfg, load_hierarchy(cfg.hierarchy.name)).to(device)
    if mode != "eager":
        compile_model(model, whole_step=not fsdp, graphs=mode == "graphs")
    if fsdp:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        apply_fsdp(model, init_device_mesh(device.type, (1,)), dtype, torch.float32)
    else:
        model.autocast = dtype != torch.float32
    raw = _raw_batch(cfg, batch)
    gen = torch.Generator().manual_seed(0)
    dgen = None if device.type == "cpu" else torch.Generator(device=device).manual_seed(1)
    grid = cfg.data.image_size // model.patch_size
    return TrainStep(model, cfg), lambda: make_step_batch(raw, cfg, gen, device, grid, dgen)


def time_compiled_step(cfg, batch: int, steps: int, device: torch.device, dtype: torch.dtype, fsdp: bool,
                       mode: str) -> float:
    """Seconds per full step compiled (``mode``: "compiled" or "graphs"), after 3 warm-up steps (the
    first compiles, and prints how long; CUDA graphs record on the next ones)."""
    step_fn, next_batch = full_step(cfg, batch, device, dtype, fsdp, mode)
    for i in range(3):
        step_fn(next_batch(), 1000 + i, sync=True)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step_fn(next_batch(), 1000 + i, sync=i == steps - 1)
    _sync(device)
    return (time.perf_counter() - t0) / steps


def time_full_step(cfg, batch: int, steps: int, device: torch.device, dtype: torch.dtype, fsdp: bool = False):
    """The eager full step: seconds per step, its FLOPs, its ``Traffic`` and a profiler breakdown."""
    step_fn, next_batch = full_step(cfg, batch, device, dtype, fsdp)

    def one(i: int, sync: bool = False):
        step_fn(next_batch(), 1000 + i, sync=sync)

    one(0, sync=True)  # warm-up
    with FlopCounterMode(display=False) as fc:
        one(0, sync=True)
    with Traffic(cfg.model.ibot_head.prototypes if cfg.model.ibot_separate_head else cfg.model.dino_head.prototypes) as traffic:
        one(0)  # a step between log steps, augmentation included
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        one(i, sync=i == steps - 1)  # as in training: one host read per log step
    _sync(device)
    return (time.perf_counter() - t0) / steps, fc.get_total_flops(), traffic, lambda: profile_parts(one, steps, device)


class Traffic(TorchDispatchMode):
    """Bytes that the memory-bound ATen operations of a step read and write: every operation except
    matrix-matrix products and attention (compute-bound) and views (no data moved), counting each tensor
    argument and result once (a tensor changed in place twice). On a GPU such an operation takes at
    least its bytes over the memory bandwidth: the floor the eager step pays for its passes over big
    tensors. ``on_last_dim`` also totals the traffic of operations on tensors whose last dimension is
    that size (the prototype logits). ``ops`` counts every ATen operation dispatched (each one a kernel
    launch or more on a GPU): the host's share of a step, the same on any device."""

    COMPUTE = {"mm", "addmm", "bmm", "baddbmm", "linear", "convolution", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
               "_scaled_dot_product_flash_attention_for_cpu", "_efficient_attention_backward",
               "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
               "_scaled_dot_product_cudnn_attention_backward", "_scaled_dot_product_flash_attention_for_cpu_backward",
               "convolution_backward"}

    def __init__(self, on_last_dim: int):
        super().__init__()
        self.on_last_dim, self.bytes, self.bytes_on_last_dim, self.ops = on_last_dim, 0, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        out = func(*args, **(kwargs or {}))
        alias = func._schema.returns[0].alias_info if func._schema.returns else None
        name = func._schema.name.split("::")[-1]
        gemv = name in ("mm", "addmm", "bmm", "baddbmm") and 1 in out.shape[-2:]  # matrix-vector: memory-bound
        if (alias is None or alias.is_write) and (name not in self.COMPUTE or gemv):
            # new_ones, zeros_like, ...: their tensor argument only gives dtype and device
            factory = name.startswith("new_") or name.endswith("_like")
            tensors = {id(t): t for t in tree_leaves(out if factory else (args, kwargs, out)) if isinstance(t, torch.Tensor)}
            size = {i: min(t.numel() * t.element_size(), t.untyped_storage().nbytes()) for i, t in tensors.items()}
            moved = sum(size.values()) + (size[id(out)] if alias is not None and id(out) in size else 0)  # in place: read + write
            self.bytes += moved
            if any(t.ndim and t.shape[-1] == self.on_last_dim for t in tensors.values()):
                self.bytes_on_last_dim += moved
        return out


PARTS = ("augment", "teacher", "student_forward", "heads_losses", "backward", "clip_optimizer", "ema")


def profile_parts(one, steps: int, device: torch.device) -> dict[str, float]:
    """Milliseconds per step of each named region of the step (``record_function`` in the trainer),
    from ``torch.profiler``: on a GPU the time of the kernels each region launched (the backward's from
    autograd's thread), on the CPU the region's CPU time; ``other`` is the rest of the profiled wall."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for i in range(steps):
            one(i, sync=i == steps - 1)
        _sync(device)
    wall = (time.perf_counter() - t0) / steps * 1000
    out = {}
    if device.type == "cuda":
        # Host-side region events only: each also has a device-side twin whose time is the span from its
        # first to its last kernel, gaps included, and summing both counted every part twice. The
        # backward's kernels are launched from autograd's own thread, outside every named region there:
        # its top-level operations count as "backward".
        host = [ev for ev in prof.events() if ev.device_type == DeviceType.CPU and not ev.is_async]
        main = {ev.thread for ev in host if ev.name in PARTS}
        for ev in host:
            if ev.name in PARTS:
                name = ev.name
            elif ev.cpu_parent is None and ev.thread not in main:
                name = "backward"
            else:
                continue
            out[name] = out.get(name, 0.0) + ev.device_time_total / 1000 / steps
    else:
        for ev in prof.key_averages():
            if ev.key in PARTS:
                out[ev.key] = out.get(ev.key, 0.0) + ev.cpu_time_total / 1000 / steps
    out["other"] = max(wall - sum(out.values()), 0.0)
    if device.type == "cuda":  # kernels and copies themselves (not the regions' device-side spans)
        kernels = (ev for ev in prof.events() if ev.device_type == DeviceType.CUDA and ev.name not in PARTS)
        busy = sum(ev.time_range.elapsed_us() for ev in kernels)
        out["gpu_busy"] = busy / 1000 / steps
    out["wall"] = wall
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = sorted((ev for ev in prof.key_averages() if ev.key not in PARTS), key=lambda ev: -getattr(ev, attr, 0))
    out["top"] = [(ev.key, getattr(ev, attr, 0) / 1000 / steps) for ev in ops[:10]]
    return out


def time_bare_step(cfg, batch: int, steps: int, device: torch.device, dtype: torch.dtype) -> tuple[float, float, int]:
    from hierdino.models.backbone import build_backbone  # heavy (timm): not for --help or a config error

    torch.manual_seed(0)
    bb = build_backbone(cfg.model.arch, cfg.data.image_size, cfg.model.drop_path_rate, cfg.model.layerscale_init).to(device)
    head = torch.nn.Linear(bb.embed_dim, 26).to(device)
    opt = torch.optim.AdamW(list(bb.parameters()) + list(head.parameters()), lr=1e-4)
    raw = _raw_batch(cfg, batch)
    x = to_model_input(raw["global"].flatten(0, 1).to(device))
    y = torch.randint(0, 26, (x.shape[0],), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def one():
        with autocast:
            loss = torch.nn.functional.cross_entropy(head(bb(x)[0]), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()
    with FlopCounterMode(display=False) as fc:
        one()
    with Traffic(0) as traffic:
        one()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    _sync(device)
    return (time.perf_counter() - t0) / steps, fc.get_total_flops(), traffic.bytes


def _ray_worker(config: dict) -> dict:
    import ray.train  # heavy: only the Ray part (skipped with --no-ray) needs Ray Train

    from hierdino.models.student_teacher import (
        StudentTeacher,  # heavy (timm): not for --help or a config error
    )
    from hierdino.train.loop import TrainStep, make_step_batch  # heavy (Ray Train, timm), likewise

    torch.set_num_threads(1)
    cfg = config_from_dict(config["config"])
    world = ray.train.get_context().get_world_size()
    torch.manual_seed(0)
    model = StudentTeacher(cfg, load_hierarchy(cfg.hierarchy.name))
    apply_fsdp(model, init_device_mesh("cpu", (world,)))
    step_fn = TrainStep(model, cfg)
    raw = _raw_batch(cfg, config["batch"] // world, seed=ray.train.get_context().get_world_rank())
    gen = torch.Generator().manual_seed(0)
    grid = cfg.data.image_size // model.patch_size
    step_fn(make_step_batch(raw, cfg, gen, torch.device("cpu"), grid), 1000)
    t0 = time.perf_counter()
    for i in range(config["steps"]):
        step_fn(make_step_batch(raw, cfg, gen, torch.device("cpu"), grid), 1000 + i)
    return {"step_s": (time.perf_counter() - t0) / config["steps"]}


def time_ray_step(cfg, batch: int, steps: int, workers: int = 2) -> float:
    import ray  # heavy: only the Ray part (skipped with --no-ray) needs Ray
    import ray.train  # heavy: likewise Ray Train
    from ray.train.torch import TorchTrainer  # heavy: likewise Ray Train

    ray.init(num_cpus=max(2, workers), include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        trainer = TorchTrainer(_ray_worker, train_loop_config={"config": cfg.to_dict(), "batch": batch, "steps": steps},
                               scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False,
                                                                      resources_per_worker={"CPU": 1}))
        result = trainer.fit()
        return result.return_value["step_s"]
    finally:
        ray.shutdown()


def print_compiled(compiled: dict[str, float], eager_s: float, bare_s: float, peak_s: float, fsdp: bool) -> None:
    """One line per compiled step: its time, against the bare and the eager step's, and its MFU
    (``peak_s``: the full step's FLOPs over the matmul peak, in seconds)."""
    for mode, step_s in compiled.items():
        name = {"compiled": "blocks compiled" if fsdp else "step compiled", "graphs": "compiled + CUDA graphs"}[mode]
        print(f"  full step, {name:22s}     {1000 * step_s:6.1f} ms   ratio full/bare {step_s / bare_s:5.2f}x"
              f"   {step_s / eager_s:5.2f}x the eager step's time, MFU {100 * peak_s / step_s:.1f}%")


def print_breakdown(breakdown: dict, device: torch.device, full_s: float) -> None:
    """The profiled eager step by part and its slowest operations."""
    wall, top = breakdown.pop("wall"), breakdown.pop("top")
    if "gpu_busy" in breakdown:
        busy = breakdown.pop("gpu_busy")
        print(f"  GPU busy (kernels and copies, profiled) {busy:.1f} ms per step = {100 * busy / (1000 * full_s):.0f}% "
              f"of the unprofiled step: the rest the GPU waits for the host")
    print(f"  eager full step by part (torch.profiler, {'device' if device.type == 'cuda' else 'CPU'} time, ms per step; "
          f"profiled wall {wall:.1f} ms, shares of it):")
    for name, ms in breakdown.items():
        print(f"    {name:16s} {ms:8.1f} ms  {100 * ms / wall:5.1f}%")
    print("  slowest operations (self time, ms per step):")
    for name, ms in top:
        print(f"    {ms:8.2f} ms  {name[:90]}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m hierdino.bench.step")
    p.add_argument("--config", default="tiny-cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--batch", type=int, default=None, help="images per step (default: train.batch_size)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled steps (eager only)")
    p.add_argument("--fsdp", action="store_true", help="the full step under FSDP2 over one rank (parameters in the "
                   "training dtype, as a multi-worker run) instead of bf16 autocast of the backbones and heads")
    logs.add_flags(p)
    args = p.parse_args(argv)
    logs.console(logs.level_from_flags(args.quiet, args.verbose))
    cfg = load_config(args.config, args.overrides)
    batch = args.batch or cfg.train.batch_size
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.scaling.use_gpu else "cpu")
    dtype = param_dtype_for(cfg.train.precision, device)
    use_tensor_cores(device)  # as the trainer
    if device.type == "cpu":
        torch.set_num_threads(1)  # compare per core with the 1-CPU Ray workers
    peak, bandwidth = matmul_peak(device, dtype), copy_bandwidth(device)
    full_s, flops, traffic, parts = time_full_step(cfg, batch, args.steps, device, dtype, args.fsdp)
    bare_s, bare_flops, bare_bytes = time_bare_step(cfg, batch, args.steps, device, dtype)
    modes = [] if args.no_compile else ["compiled", "graphs"] if device.type == "cuda" else ["compiled"]
    compiled = {mode: time_compiled_step(cfg, batch, args.steps, device, dtype, args.fsdp, mode) for mode in modes}
    print(f"{args.config} ({cfg.model.arch}, {cfg.data.image_size} px, batch {batch}, {device}, {dtype}"
          f"{', full step under FSDP2 on one rank' if args.fsdp else ''})")
    print(f"  bare step (backbone fwd/bwd + AdamW)     {1000 * bare_s:9.1f} ms")
    print(f"  full step (teacher, student, 4 losses, EMA) {1000 * full_s:6.1f} ms   ratio full/bare {full_s / bare_s:5.2f}x"
          f"   (eager)")
    print_compiled(compiled, full_s, bare_s, flops / peak, args.fsdp)
    print(f"  full step FLOPs {flops / 1e9:.1f} GFLOP -> {flops / full_s / 1e12:.3f} TFLOP/s; matmul peak "
          f"{peak / 1e12:.3f} TFLOP/s; MFU {100 * flops / full_s / peak:.1f}%")
    # The full step also runs the student on the local crops and the supervised view, the teacher and
    # the heads: at the bare step's FLOP rate its time would be the FLOP ratio times the bare step's.
    print(f"  bare step FLOPs {bare_flops / 1e9:.1f} GFLOP -> {bare_flops / bare_s / 1e12:.3f} TFLOP/s, MFU "
          f"{100 * bare_flops / bare_s / peak:.1f}%; FLOPs full/bare {flops / bare_flops:.2f}x (the time ratio at equal "
          f"FLOP rates), measured {full_s / bare_s:.2f}x")
    print(f"  ATen operations dispatched by one eager full step between log steps: {traffic.ops}")
    print(f"  memory-bound operations' traffic per full step: {traffic.bytes / 1e9:.2f} GB, of which "
          f"{traffic.bytes_on_last_dim / 1e9:.2f} GB over [rows, {traffic.on_last_dim}] prototype tensors "
          f"(the eager step's); at the "
          f"measured copy bandwidth of {bandwidth / 1e9:.0f} GB/s at least {1000 * traffic.bytes / bandwidth:.1f} ms "
          f"({1000 * traffic.bytes_on_last_dim / bandwidth:.1f} ms over the prototypes); the bare step's "
          f"{bare_bytes / 1e9:.2f} GB: traffic full/bare {traffic.bytes / max(bare_bytes, 1):.2f}x")
    print_breakdown(parts(), device, full_s)
    if not args.no_ray and device.type == "cpu":
        ray_s = time_ray_step(cfg, batch, args.steps)
        print(f"  2 Ray Train workers (FSDP2, gloo), same global batch {1000 * ray_s:9.1f} ms   "
              f"ratio vs single process {ray_s / full_s:5.2f}x (ideal 0.50x)")


if __name__ == "__main__":
    main()
