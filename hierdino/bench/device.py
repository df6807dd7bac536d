"""Benchmark and checks that need a GPU (issue #13), in one short run:

- host syncs: one full training step between log steps (``sync=False``), its batch's host-to-device
  copies and augmentation included, under
  ``torch.cuda.set_sync_debug_mode("warn")``, which reports every call that makes the GPU wait for
  the host (``.item()``, ``nonzero``, synchronising copies): the step should make none;
- device decode: images/s of ``data.decode: device`` (nvJPEG decode of a batch, then every view cut
  with ``roi_align``) against the CPU path's images/s per core on the same JPEGs (PIL decode +
  crops, one process), and so the CPU cores the CPU path needs per GPU for the same rate.

  python -m hierdino.bench.device [--config vits14] [--batch 32] [--images 256] [--source-size 256]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from hierdino import logs
from hierdino.bench.ingest import _images
from hierdino.bench.step import full_step
from hierdino.config import load_config
from hierdino.train.metrics import as_tensors
from hierdino.train.parallel import param_dtype_for, use_tensor_cores


def host_syncs(cfg, batch: int, device: torch.device) -> list[str]:
    """The messages of every host sync one step between log steps makes (empty: none)."""
    step, next_batch = full_step(cfg, batch, device, param_dtype_for(cfg.train.precision, device))
    for i in range(2):  # warm: lazily created state (optimizer, centers, the first log step's reads)
        step(next_batch(), 1000 + i, sync=True)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:  # the batch too: its pinned copies and the device augmentation are part of every step
            step(next_batch(), 1002, sync=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return [f"{w.filename}:{w.lineno}: {str(w.message)[:160]}" for w in caught if "called a synchronizing" in str(w.message)]


def decode_rates(images: int, source: int, device: torch.device) -> tuple[float, float]:
    """(images/s of the device path, images/s of the CPU path on one core) for 2 x 224 px global,
    8 x 96 px local and one supervised view per image."""
    from hierdino.data.device_decode import decode_views
    from hierdino.data.ingest import CropSpec, multicrop

    blobs = _images(images, source)
    n = len(blobs)
    batch = {"image": np.array(blobs, dtype=object), "image_id": np.array([f"i{i}" for i in range(n)]),
             "label": np.array(["monocyte"] * n, dtype=object), "split": np.array(["train"] * n)}
    idx = {"monocyte": 0}
    spec = CropSpec(224, (0.32, 1.0), 8, 96, (0.05, 0.32), True, seed=0, decode="device")
    planned = multicrop(batch, spec, idx, epoch=0)
    raw = as_tensors(planned)
    decode_views(raw, 224, 8, 96, device)  # warm: nvJPEG handles, kernels
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        out = decode_views(raw, 224, 8, 96, device)
    torch.cuda.synchronize()
    dev_rate = reps * n / (time.perf_counter() - t0)
    assert bool(out["ok"].all()), "nvJPEG failed on a synthetic JPEG"
    torch.set_num_threads(1)
    cpu_spec = CropSpec(224, (0.32, 1.0), 8, 96, (0.05, 0.32), True, seed=0)
    m = min(n, 64)
    small = {k: v[:m] for k, v in batch.items()}
    t0 = time.perf_counter()
    multicrop(small, cpu_spec, idx, epoch=0)
    cpu_rate = m / (time.perf_counter() - t0)
    return dev_rate, cpu_rate


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m hierdino.bench.device")
    p.add_argument("--config", default="vits14")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--source-size", type=int, default=256)
    logs.add_flags(p)
    args = p.parse_args(argv)
    logs.console(logs.level_from_flags(args.quiet, args.verbose))
    if not torch.cuda.is_available():
        raise SystemExit("hierdino.bench.device needs a CUDA GPU")
    device = torch.device("cuda")
    use_tensor_cores(device)
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    cfg = load_config(args.config, [])
    syncs = host_syncs(cfg, args.batch, device)
    print(f"host syncs in one {args.config} step between log steps (batch {args.batch}): {len(syncs)}")
    for s in syncs:
        print(f"    {s}")
    dev_rate, cpu_rate = decode_rates(args.images, args.source_size, device)
    print(f"decode + 2x224 + 8x96 + sup views from {args.source_size} px JPEGs: device {dev_rate:.0f} images/s; "
          f"CPU path {cpu_rate:.1f} images/s per core -> {dev_rate / cpu_rate:.0f} cores for the device's rate")


if __name__ == "__main__":
    main()
