"""Benchmark: images/s of ``jobs/embed.py`` (``run_embed``: Ray Data read tasks + an actor pool ->
Parquet) against a plain single-process PyTorch loop (a ``DataLoader`` without workers + the same
model, one torch thread) over the same images, per core, at 1 and 2 actors.

  python -m hierdino.bench.embed --images ../shared/data/real-wbc/pbc/PBC_dataset_normal_DIB   # all 2,994
  python -m hierdino.bench.embed                                     # 1024 synthetic 96 px PNGs
  python -m hierdino.bench.embed --model random:vit_small_patch14_dinov2@224 --n 256

Both paths decode with ``decode.decode_rows`` (PIL, bicubic resize) and embed with
``backbone_features``, one torch thread each: the plain loop sets it, and Ray gives an actor that
reserves one CPU ``OMP_NUM_THREADS=1``. Per path:

- **steady**: images/s once running. The plain loop is timed from its first batch (the model is
  built before); the job from the moment every actor has embedded a batch to its last batch (the
  summary's ``steady_images_per_s``, from the times the actors stamp on their batches), which leaves
  out the pool's start-up (a worker process per actor importing torch and timm, then the model):
  over millions of cells that start-up is paid once per actor. "per core" divides the job's rate
  by its actors (on a GPU machine the actors share the one GPU, 1/k each: "per GPU" is the job's
  rate). Parts are small (``--files-per-part``, default 1/8 of an actor's share) so that the actors
  share the work evenly to the end.
- **whole**: images over the whole ``run_embed`` call (start-up included), which is what a job of
  this size costs. Ray Data's own actors (stats, autoscaling coordinator, actor locations), which a
  cluster starts once for its first dataset, are started before by an untimed one-row dataset.
- **CPU per image**: the plain loop's process time; for the job, the CPU time of this process and
  all its descendants (the driver, the local Ray cluster it started, every Ray worker: read tasks,
  actors, Ray's own processes), steady and from the call to the last batch embedded. On a machine
  shared with other work the wall-clock rates drift with its load, CPU time much less; and it
  charges the job for everything it runs besides its actors.

The plain loop runs before and after the jobs, and the ratios use the mean of the two (the drift of
the machine's load between them shows in the two lines). On a GPU machine the plain loop and the
actors use the GPU (images/s per GPU) and the line "CPU cores per GPU" divides the GPU rate by the
plain loop's decode rate per core (the decode runs in CPU tasks there). Timings only: nothing is
asserted.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image

from hierdino import logs
from hierdino.eval.decode import decode_rows
from hierdino.eval.embed import EmbedOptions, image_files, run_embed
from hierdino.eval.features import backbone_features, load_backbone, resolve_model


def _synthetic(folder: str, n: int, size: int = 96) -> str:
    for i in range(n):
        arr = (np.random.default_rng(i).random((size, size, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"img_{i:05d}.png"))
    return folder


def _subset(src: str, n: int | None, folder: str) -> str:
    """The first ``n`` images of ``src`` (sorted paths; all when None) as links in ``folder``: both
    paths read the same files."""
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
            return torch.from_numpy(decode_rows([f.read()], self.size)[0][0])


def plain_loop(folder: str, spec: str, batch_size: int) -> dict:
    """A DataLoader (no workers) + the model, one torch thread: images, images/s, CPU-s per image,
    and the seconds per image spent decoding (the loader) and in the model."""
    torch.set_num_threads(1)
    model = resolve_model(spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(model).to(device)
    paths = [os.path.join(folder, n) for n in image_files(folder)]
    loader = iter(torch.utils.data.DataLoader(_Files(paths, model.img_size), batch_size=batch_size, num_workers=0))
    t0, cpu0, n, decode_s, model_s = time.perf_counter(), time.process_time(), 0, 0.0, 0.0
    while True:
        t = time.perf_counter()
        batch = next(loader, None)
        if batch is None:
            break
        t1 = time.perf_counter()
        backbone_features(backbone, batch.numpy(), model.img_size, batch_size, device)
        if device == "cuda":
            torch.cuda.synchronize()
        decode_s, model_s, n = decode_s + t1 - t, model_s + time.perf_counter() - t1, n + len(batch)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"images": n, "rate": n / wall, "cpu_per_image": cpu / n,
            "decode_s": decode_s / n, "model_s": model_s / n}


def _cpu_by_process() -> dict[tuple[int, int], float]:
    """CPU seconds (user + system, of the process itself) of this process and of each living
    descendant (the local Ray cluster that ``ray.init`` started, its workers), keyed by (pid, start
    time); {} without Linux ``/proc``."""
    if not os.path.isdir("/proc"):
        return {}
    tick, procs, children = os.sysconf("SC_CLK_TCK"), {}, {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                v = f.read().rsplit(")", 1)[1].split()  # v[1] ppid, v[11:13] utime stime, v[19] start time
        except OSError:  # exited meanwhile
            continue
        procs[int(name)] = (int(v[19]), (int(v[11]) + int(v[12])) / tick)
        children.setdefault(int(v[1]), []).append(int(name))
    out, todo = {}, [os.getpid()]
    while todo:
        pid = todo.pop()
        if pid in procs:
            out[(pid, procs[pid][0])] = procs[pid][1]
        todo += children.get(pid, [])
    return out


class _CpuSampler:
    """The CPU time this process and its descendants used, sampled every ``every_s`` seconds in a
    thread, to read it between two moments of a call that runs in this thread (the pool up, the last
    batch embedded). A process keeps its last reading after it exits (Ray ends the actors when
    the job is done); the sampler's own CPU time is left out."""

    def __init__(self, every_s: float = 0.25):
        self.samples: list[tuple[float, float]] = []
        self.seen: dict[tuple[int, int], float] = {}
        self.own = 0.0
        self.every_s, self.stop = every_s, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> float:
        """Take a sample now; returns its time."""
        t, own = time.monotonic(), time.thread_time()
        self.seen.update(_cpu_by_process())
        self.samples.append((t, sum(self.seen.values()) - self.own))
        self.own += time.thread_time() - own
        return t

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.sample()

    def __enter__(self) -> "_CpuSampler":
        self.sample()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def at(self, t: float) -> float | None:
        """The CPU seconds at monotonic time ``t`` (linear between samples); None without ``/proc``."""
        if not self.seen:
            return None
        ts, cpus = zip(*sorted(self.samples))
        return float(np.interp(t, ts, cpus))


def ray_job(folder: str, spec: str, batch_size: int, actors: int, files_per_part: int, out: str) -> dict:
    """``run_embed`` over ``folder`` with ``actors`` actors: its summary, plus the call's wall time and
    CPU seconds per image: from the call to the last batch embedded (the pool's start-up included),
    and from the pool up (every actor's first batch embedded) to the last batch (steady)."""
    gpu = torch.cuda.is_available()
    model = resolve_model(spec)
    opts = EmbedOptions(batch_size=batch_size, actors=actors, files_per_part=files_per_part,
                        gpus_per_actor=1 / actors if gpu else None)
    with _CpuSampler() as cpu, logs.quiet():
        t0 = cpu.sample()
        s = run_embed(model, [folder], out, opts)
        t1 = cpu.sample()
    n = s["images"]
    # the summary's times run from the pool's start; the call ends just after the summary
    up, last = (t1 - (s["seconds"] - s[k]) for k in ("pool_up_s", "last_batch_s"))
    c0, cu, cl = cpu.at(t0), cpu.at(up), cpu.at(last)
    return s | {"call_s": t1 - t0, "call_rate": n / (t1 - t0),
                "cpu_per_image": None if c0 is None else (cl - c0) / n,
                "steady_cpu_per_image": None if c0 is None or not s["steady_images"] or cl <= cu
                else (cl - cu) / s["steady_images"]}


def _cpu(x: float | None) -> str:
    return "n/a" if x is None else f"{1000 * x:.2f} ms"


def _print_ratios(jobs: dict, before: dict, after: dict, gpu: bool) -> None:
    """Each job against the plain loop (the mean of its runs before and after), per core or GPU."""
    unit = "GPU" if gpu else "core"
    units = lambda k: 1 if gpu else k  # noqa: E731  (on a GPU the k actors share it: 1/k GPU each)
    rate = (before["rate"] + after["rate"]) / 2
    cpu = (before["cpu_per_image"] + after["cpu_per_image"]) / 2
    print(f"per {unit}, against the plain loop ({rate:.1f} images/s, the mean of before and after):")
    ratio = lambda x: "n/a" if not x else f"{cpu / x:.2f}x"  # noqa: E731
    for k, s in jobs.items():
        print(f"  {k} actor(s): steady {s['steady_images_per_s'] / units(k) / rate:.2f}x, whole call "
              f"{s['call_rate'] / units(k) / rate:.2f}x; by CPU time (all the job's processes): steady "
              f"{ratio(s['steady_cpu_per_image'])}, whole {ratio(s['cpu_per_image'])}")
    if 1 in jobs and len(jobs) > 1:
        one = jobs[1]["steady_images_per_s"]
        print("  scaling (steady images/s against 1 actor): "
              + ", ".join(f"{k} actors {s['steady_images_per_s'] / one:.2f}x" for k, s in jobs.items() if k != 1))
    if gpu:
        per_core = 1 / ((before["decode_s"] + after["decode_s"]) / 2)
        best = max(s["steady_images_per_s"] for s in jobs.values())
        print(f"  CPU cores per GPU for the decode: {best:.0f} images/s per GPU / {per_core:.0f} decoded per core = "
              f"{best / per_core:.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hierdino.bench.embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=None, help="a folder of images (default: synthetic PNGs)")
    p.add_argument("--n", type=int, default=None, help="images (default: all of --images, else 1024)")
    p.add_argument("--model", default="random:vit_tiny_cpu@64")
    p.add_argument("--batch-size", type=int, default=64, help="both paths (the job's default: 64)")
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    p.add_argument("--files-per-part", type=int, default=None,
                   help="images per output file (default: 1/8 of an actor's share, at least 32)")
    logs.add_flags(p, verbose_help="run_embed's own lines")
    args = p.parse_args(argv)
    logs.console(logs.level_from_flags(args.quiet, args.verbose))
    from hierdino.runtime import init_ray  # Ray: after the argument check

    gpu = torch.cuda.is_available()
    unit = "GPU" if gpu else "core"
    with tempfile.TemporaryDirectory(prefix="hierdino-bench-embed-") as tmp:
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        _subset(args.images, args.n, folder) if args.images else _synthetic(folder, args.n or 1024)

        def plain(when: str) -> dict:
            r = plain_loop(folder, args.model, args.batch_size)
            print(f"plain loop {when} (DataLoader, 1 process, 1 thread{', GPU' if gpu else ''}): {r['images']} images, "
                  f"{r['rate']:.1f} images/s, {_cpu(r['cpu_per_image'])} CPU per image (decode "
                  f"{1000 * r['decode_s']:.2f} ms, model {1000 * r['model_s']:.2f} ms per image)", flush=True)
            return r

        before = plain("before")
        init_ray(num_cpus=max(args.actors) + 1)
        import ray.data  # Ray: after the argument check

        ray.data.range(1).materialize()  # Ray Data's own actors (stats, ...): once per cluster, not per job
        jobs = {}
        units = lambda k: 1 if gpu else k  # noqa: E731  (on a GPU the k actors share it: 1/k GPU each)
        for k in args.actors:
            fpp = args.files_per_part or max(32, before["images"] // (8 * k))
            s = jobs[k] = ray_job(folder, args.model, args.batch_size, k, fpp, os.path.join(tmp, f"out-{k}"))
            print(f"ray data, {k} actor(s), {fpp} images per file: {s['images']} images; whole call "
                  f"{s['call_rate']:.1f} images/s ({s['call_s']:.1f} s; the pool up after {s['pool_up_s']:.1f} s), "
                  f"{_cpu(s['cpu_per_image'])} CPU per image; steady {s['steady_images_per_s']:.1f} images/s = "
                  f"{s['steady_images_per_s'] / units(k):.1f} per {unit}, {_cpu(s['steady_cpu_per_image'])} CPU per image",
                  flush=True)
        after = plain("after")
    _print_ratios(jobs, before, after, gpu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
