"""Benchmark: images/s of ``jobs/embed.py`` (Ray Data: read tasks + an actor pool) against a plain
single-process PyTorch loop (a ``DataLoader`` without workers + the same model) over the same images,
per CPU core, at 1 and 2 actors.

  python -m hierdino.bench.embed                                   # 256 synthetic 96 px PNGs
  python -m hierdino.bench.embed --images ../shared/data/real-wbc/pbc/PBC_dataset_normal_DIB --n 400
  python -m hierdino.bench.embed --model random:vit_small_patch14_dinov2@224 --n 128

Both paths decode with ``features._decode`` (PIL, bicubic resize) and embed with ``backbone_features``;
the plain loop runs with one torch thread (one core), each Ray actor reserves one CPU (Ray sets one
thread). Ray's rates are given over the whole job (actor start-up included) and after the first
batch is back (an upper bound of the steady rate: the pool works ahead of the driver, so give it
enough images that start-up is a small part of the job); "per core" divides by the actors (the read tasks and the driver's Parquet
writing are the overhead measured). On a GPU machine the plain loop and the actors use the GPU
(images/s per GPU). Timings only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from hierdino.eval.embed import EmbedOptions, image_files, run_embed
from hierdino.eval.features import _decode, backbone_features, load_backbone, resolve_model


def _synthetic(folder: str, n: int, size: int = 96) -> str:
    for i in range(n):
        arr = (np.random.default_rng(i).random((size, size, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"img_{i:05d}.png"))
    return folder


def _subset(src: str, n: int, folder: str) -> str:
    """The first ``n`` images of ``src`` (sorted paths) as links in ``folder``: both paths read the same files."""
    for name in image_files(src)[:n]:
        dest = os.path.join(folder, name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.symlink(os.path.abspath(os.path.join(src, name)), dest)
    return folder


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with open(self.paths[i], "rb") as f:
            return torch.from_numpy(_decode([f.read()], self.size)[0][0])


def plain_loop(folder: str, spec: str, batch_size: int) -> tuple[float, int]:
    """(images/s, images) of a DataLoader (no workers) + the model, one torch thread."""
    torch.set_num_threads(1)
    model = resolve_model(spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(model).to(device)
    paths = [os.path.join(folder, n) for n in image_files(folder)]
    loader = torch.utils.data.DataLoader(_Files(paths, model.img_size), batch_size=batch_size, num_workers=0)
    t0, n = time.perf_counter(), 0
    for batch in loader:
        backbone_features(backbone, batch.numpy(), model.img_size, batch_size, device)
        n += len(batch)
    return n / (time.perf_counter() - t0), n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hierdino.bench.embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=None, help="a folder of images (default: synthetic PNGs)")
    p.add_argument("--n", type=int, default=256, help="images")
    p.add_argument("--model", default="random:vit_tiny_cpu@64")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    from hierdino.runtime import init_ray  # Ray: after the argument check

    with tempfile.TemporaryDirectory(prefix="hierdino-bench-embed-") as tmp:
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        _subset(args.images, args.n, folder) if args.images else _synthetic(folder, args.n)
        plain, n = plain_loop(folder, args.model, args.batch_size)
        gpu = torch.cuda.is_available()
        print(f"plain loop (DataLoader, 1 process, 1 thread{', GPU' if gpu else ''}): {n} images, {plain:.1f} images/s")
        init_ray(num_cpus=max(args.actors) + 1)
        model = resolve_model(args.model)
        for k in args.actors:
            s = run_embed(model, [folder], os.path.join(tmp, f"out-{k}"),
                          EmbedOptions(batch_size=args.batch_size, actors=k, files_per_part=max(1, n // (4 * k)),
                                       gpus_per_actor=1 / k if gpu else None),
                          log=lambda *a, **kw: None)
            whole, steady = s["images_per_s"], s["steady_images_per_s"]
            print(f"ray data, {k} actor(s): {whole:.1f} images/s whole job ({s['seconds']:.1f} s, first batch back after "
                  f"{s['first_batch_s']:.1f} s), {steady:.1f} after it; per {'GPU' if gpu else 'core'}: {steady / k:.1f} = {steady / k / plain:.2f}x the "
                  f"plain loop (whole job {whole / k / plain:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
