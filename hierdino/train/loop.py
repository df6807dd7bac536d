"""The training loop run by every Ray Train worker (``train_loop_per_worker``).

Reads top to bottom: ``train_loop_per_worker`` builds the model (``build_model``) and optimiser,
resumes from the newest complete checkpoint (``CheckpointManager``), then for each step: next
batch (``TrainMetrics.next_batch``) -> device augmentation (``make_step_batch``) -> ``TrainStep``
(losses, backward, clip, AdamW, EMA) -> log (``TrainMetrics.log_step``) -> checkpoint; finally it
exports the teacher backbone. ``TrainStep`` is also used alone by the tests and ``hierdino.bench.step``.
"""

from __future__ import annotations

import logging
import math
import socket
import time

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.profiler import record_function

from hierdino import logs, storage
from hierdino.config import Config, config_from_dict
from hierdino.config.compat import ResumeError
from hierdino.data.augment import augment_views
from hierdino.data.ingest import stream_name
from hierdino.data.masking import ibot_masks, max_masked_patches, padded_mask_index
from hierdino.data.mix import MixedBatches, MixSchedule
from hierdino.data.transfer import select_rows, to_device
from hierdino.hierarchy import load_hierarchy
from hierdino.models.student_teacher import StepBatch, StudentTeacher, param_groups
from hierdino.runtime import quiet_train_reports
from hierdino.storage import StorageOptions
from hierdino.train.checkpoint import CheckpointManager
from hierdino.train.export import export_teacher
from hierdino.train.metrics import TrainMetrics
from hierdino.train.parallel import (
    apply_fsdp,
    local_param_fraction,
    param_checksum,
    param_dtype_for,
    use_tensor_cores,
)
from hierdino.train.schedules import Schedules
from hierdino.train.stop import StopPoller

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss that is NaN or infinite; the last good checkpoint is left as it is."""


def make_step_batch(raw: dict, cfg: Config, gen: torch.Generator, device: torch.device, grid: int,
                    device_gen: torch.Generator | None = None) -> StepBatch:
    """uint8 crops from the ingest (host tensors) -> augmented, normalised device tensors plus iBOT masks.

    Everything whose size depends on the data (the valid rows, the labelled rows, the masked
    patches) is selected on the host, where it is free; the device work has fixed shapes and never
    reads values back. On a GPU the host tensors are staged in pinned memory first: a copy from
    pageable memory blocks the host until the GPU has drained the work queued before it, so the
    host could not queue the next step while the GPU runs this one. Masks come from ``gen`` (host),
    photometric parameters from ``device_gen`` (default ``gen``; give a generator on ``device`` for
    GPU runs).
    """
    with record_function("augment"):
        return _make_step_batch(raw, cfg, gen, device, grid, device_gen or gen)


def _make_step_batch(raw, cfg, gen, device, grid, dgen) -> StepBatch:
    ok = raw["ok"].bool()  # host masks (ok, has) select rows of host or device tensors (data.decode: device)

    def rows(t: torch.Tensor) -> torch.Tensor:
        return select_rows(t, ok)

    g = to_device(rows(raw["global"]), device)
    b = g.shape[0]
    loc = to_device(rows(raw["local"]), device) if "local" in raw and cfg.data.local_crops_number > 0 else None
    host_labels = rows(raw["label"])
    labels = to_device(host_labels, device)
    sup = None
    if "sup" in raw:
        has = host_labels >= 0
        sup = to_device(select_rows(rows(raw["sup"]), has), device)
    crops, local, sup_images = augment_views(g, loc, sup, dgen, tuple(cfg.data.color_jitter), cfg.data.grayscale_p)
    if sup_images is not None:  # one view per image (zeros where unlabelled: out of the loss), a shape fixed by the batch size
        sup_images = _rows_into(sup_images, has, device)
    p, ratio = cfg.data.mask_sample_prob, tuple(cfg.data.mask_ratio)
    masks = ibot_masks(2 * b, grid, p, ratio, gen)
    mask_index, mask_weight = padded_mask_index(masks, max_masked_patches(2 * b, grid, p, ratio))
    return StepBatch(crops, local, to_device(masks, device), labels, sup_images, to_device(mask_index, device),
                     to_device(mask_weight, device))


def _rows_into(t: torch.Tensor, where: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[len(where), ...]`` zeros with ``t``'s rows at the rows where the host bool ``where`` holds."""
    if bool(where.all()):  # a host read: free
        return t
    out = t.new_zeros(len(where), *t.shape[1:])
    return out.index_copy_(0, to_device(where.nonzero().squeeze(1), device), t)


def compile_model(model: StudentTeacher, whole_step: bool = True, graphs: bool | None = None,
                  backend: str = "inductor") -> None:
    """``train.compile``. One worker (``whole_step``): ``torch.compile`` the whole step's maths
    (``StudentTeacher.step_losses``: teacher, student, heads, targets, losses; AOTAutograd compiles its
    backward) as one graph, ``fullgraph=True`` (a graph break is an error) and ``dynamic=False``:
    every shape is fixed by the config, so it compiles once for the run. With ``graphs`` (default: on
    a GPU) ``mode="reduce-overhead"``: CUDA graphs replay the step's kernels without launching each.
    Several workers (FSDP2, whose hooks break a whole-model graph): each transformer block of both
    towers, before FSDP wraps them (as torchtitan does), and the targets and losses (``compile_losses``).
    ``backend``: of the whole step (tests: "aot_eager" traces forward and backward as inductor does,
    without its minutes of code generation on a CPU)."""
    if whole_step:
        graphs = next(model.parameters()).device.type == "cuda" if graphs is None else graphs
        model.step_losses = torch.compile(model.step_losses, fullgraph=True, dynamic=False, backend=backend,
                                          mode="reduce-overhead" if graphs else None)
        model.compiled = "graphs" if graphs else "step"
        return
    for tower in (model.student, model.teacher):
        for block in tower["backbone"].blocks:
            block.compile()
    model.compile_losses()
    model.compiled = "blocks"


def supervised_summary(model: StudentTeacher) -> str:
    """The effective supervised loss, with per-level weights for HXE (printed at start)."""
    sup = model.cfg.loss.supervised
    if model.sup_loss is None:
        return "supervised loss: none"
    text = f"supervised loss: {sup.kind} x{sup.weight}"
    if hasattr(model.sup_loss, "weights"):
        text += f", normalize={sup.normalize}, effective level weights " + ", ".join(f"{w:.4f}" for w in model.sup_loss.weights)
    return text


class TrainStep:
    """One optimisation step with schedules: losses, backward, last-layer freeze, clipping, AdamW, EMA.

    Between log steps nothing is read back from the device (no ``.item()``, ``bool(tensor)`` or
    data-dependent shapes), so a GPU never waits for the host. The loss terms are summed on the
    device over the steps since the last read; ``sync=True`` reads them back as means over that
    window (with this step's gradient norms, schedules and, with ``monitor``, collapse statistics).

    A step whose loss terms or gradient norms are not finite is not applied, decided on the device:
    the fused AdamW skips its update when ``found_inf`` is set (as under a gradient scaler), and the
    teacher centres keep their values. At the next read the skipped steps are counted against
    ``train.skip_nonfinite_steps`` (a warning each); past it ``NonFiniteLossError`` names the first
    skipped step and its non-finite terms, before any checkpoint of the damaged window is written.
    """

    def __init__(self, model: StudentTeacher, cfg: Config):
        self.model, self.cfg = model, cfg
        self.schedules = Schedules.from_config(cfg)
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult),
                                           lr=self.schedules.lr, betas=tuple(cfg.optim.betas), fused=True)
        self._window: torch.Tensor | None = None   # sum of [loss, terms...] over the applied steps since the last sync
        self._votes: torch.Tensor | None = None    # ranks' stop votes (all-reduced) summed since the last sync
        # (step, 0-d bad flag, checked values, their names) per step since the last sync
        self._bad: list[tuple[int, torch.Tensor, torch.Tensor, list[str]]] = []
        self.skipped = 0  # non-finite steps skipped so far (this process)
        self._compiling = model.compiled is not None  # the first step compiles: its time is printed once

    def __call__(self, batch: StepBatch, step: int, monitor: bool = False, sync: bool = True,
                 stop_vote: bool = False) -> dict[str, float] | None:
        """One step; returns the host record when ``sync`` (else None).

        ``stop_vote``: this rank has been asked to stop (``hierdino.train.stop``). Across ranks the
        votes ride in the step's all-reduce of the loss terms; at the next read every rank sees the
        same ``stop_votes`` (> 0: some rank voted since the last read), so all stop after the same step.
        """
        s = self.schedules.at(step)
        for g in self.optimizer.param_groups:
            g["lr"] = s["lr"] * g["lr_mult"]
            g["weight_decay"] = s["wd"] * g["wd_mult"]
        t0 = time.perf_counter()
        if self.model.compiled == "graphs":  # a new step: the CUDA graphs may reuse the last step's output memory
            torch.compiler.cudagraph_mark_step_begin()
        loss, terms, stats = self.model.losses(batch, s["teacher_temp"], monitor=monitor)
        values = torch.stack([loss.detach()] + [t.detach().float() for t in terms.values()])
        if dist.is_initialized():
            values = torch.cat([values, values.new_full((1,), float(stop_vote))])  # a fill: no host copy
            dist.all_reduce(values)
            values /= dist.get_world_size()
            values, votes = values[:-1], values[-1]
            self._votes = votes if self._votes is None else self._votes + votes
        with record_function("backward"):
            loss.backward()  # outside autocast: only the backbone and head forwards run in bf16
        if self._compiling:  # the forward's graph compiles at the first call, the backward's at the first backward
            self._compiling = False
            logger.info(f"train.compile ({self.model.compiled}): the first step compiled in "
                        f"{time.perf_counter() - t0:.1f} s")
        self._drop_frozen_grads(step, s["freeze_last_layer"])
        with record_function("clip_optimizer"):
            norms = self._clip()
            checked = torch.cat([values] + [n.reshape(1).float() for n in norms.values()])  # losses, gradient norms
            bad = ~torch.isfinite(checked).all()
            self.optimizer.found_inf = bad.float()  # the fused AdamW skips the whole update when set (same on every rank)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with record_function("ema"):
            self.model.update_teacher(s["momentum"])  # a skipped step leaves the student as it was
        self._bad.append((step + 1, bad, checked, ["loss", *terms, *norms]))  # (step + 1): as the progress line counts
        kept = torch.where(bad, torch.zeros_like(values), values)
        self._window = kept if self._window is None else self._window + kept
        if not sync:
            return None
        out = self._read_window(step, ["loss", *terms], norms)
        out.update(lr=s["lr"], wd=s["wd"], momentum=s["momentum"], teacher_temp=s["teacher_temp"])
        out.update(stats)
        return out

    def _drop_frozen_grads(self, step: int, freeze_last_layer: bool) -> None:
        """No gradient for frozen parts: AdamW neither moves nor decays them this step."""
        frozen = self.model.last_layers() if freeze_last_layer else []
        if step < self.cfg.train.freeze_backbone_steps:
            frozen.append(self.model.student["backbone"])
        for module in frozen:
            for p in module.parameters():
                p.grad = None

    def _clip(self) -> dict[str, torch.Tensor]:
        """Clip each student submodule on its own, as DINOv2; returns their (global) gradient norms."""
        norms = {}
        if self.cfg.optim.clip_grad > 0:
            for name, params in self.model.clip_groups().items():
                params = [p for p in params if p.grad is not None]
                if params:
                    n = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.clip_grad)
                    norms[f"grad_norm_{name}"] = n.full_tensor() if hasattr(n, "full_tensor") else n
        return norms

    def _read_window(self, step: int, names: list[str], norms: dict[str, torch.Tensor]) -> dict[str, float]:
        """The one host read: means of the applied steps since the last read, skipped steps counted."""
        flags = torch.stack([b for _, b, _, _ in self._bad]).tolist()
        bad_steps = [(st, v, n) for (st, _, v, n), f in zip(self._bad, flags) if f]
        applied = len(flags) - len(bad_steps)
        window = (self._window / max(applied, 1)).tolist()
        self._window, self._bad = None, []
        limit = self.cfg.train.skip_nonfinite_steps
        for st, v, checked_names in bad_steps:
            self.skipped += 1
            listed = ", ".join(f"{k}={x:.4g}" for k, x in zip(checked_names, v.tolist()))
            if self.skipped > limit:
                raise NonFiniteLossError(
                    f"non-finite loss at step {st} (found at step {step + 1}; the step was not applied): {listed}; "
                    f"{self.skipped - 1} earlier step(s) skipped of train.skip_nonfinite_steps={limit}. "
                    "The last checkpoint holds the state before it.")
            logger.warning(f"WARNING: step {st} skipped, non-finite: {listed} "
                           f"({self.skipped} of train.skip_nonfinite_steps={limit})")
        out = dict(zip(names, window))
        if self._votes is not None:
            out["stop_votes"], self._votes = float(self._votes), None
        if norms:
            out.update(zip(norms, torch.stack(list(norms.values())).float().tolist()))
        return out


# -- setup helpers of the loop ------------------------------------------------------------------------------


def check_shared_run_dir(run_uri: str, options) -> None:
    """The driver wrote ``config.yaml`` into the run directory before any worker started: a worker that
    cannot see it is on a node that does not share the driver's local ``run.storage``, where its
    checkpoint shards would be stranded (no resume, no export for the evaluation)."""
    if storage.is_s3(run_uri) or storage.exists(storage.join(run_uri, "config.yaml"), options):
        return
    raise RuntimeError(f"the run directory {run_uri} is not visible from node {socket.gethostname()} (no config.yaml, "
                       "which the driver wrote there): run.storage must be shared by every node of the cluster; use "
                       "an s3:// URI or a shared filesystem mounted at the same path on every node")


def build_model(cfg: Config, device: torch.device, world: int, rank: int = 0,
                resuming: bool = False) -> StudentTeacher:
    """Student and teacher on ``device``: pretrained weights (said by rank 0), compiled blocks, FSDP2
    over ``world`` ranks (or bf16 autocast of the backbone and head forwards on one)."""
    torch.manual_seed(cfg.train.seed)  # identical initialisation on every rank
    model = StudentTeacher(cfg, load_hierarchy(cfg.hierarchy.name))
    if cfg.model.init_weights and not resuming:  # a resumed run's weights come from its checkpoint
        for line in model.load_pretrained(cfg.model.init_weights, cfg.model.init_strict, cfg.model.init_tower,
                                          StorageOptions.from_config(cfg)):
            if rank == 0:
                logger.info(line)
    model.to(device)
    if cfg.train.compile:
        compile_model(model, whole_step=world == 1)
    dtype = param_dtype_for(cfg.train.precision, device)
    if world > 1:
        apply_fsdp(model, init_device_mesh(device.type, (world,)), dtype, torch.float32)
    elif dtype == torch.bfloat16:
        model.autocast = True
    return model


def open_batches(loop_config: dict, cfg: Config, rank: int, per_worker: int, start: int) -> MixedBatches:
    """This worker's mixed batches from its shard of every dataset stream, from step ``start`` on. The
    streams begin where the driver launched the run (``loop_config["start_step"]``); a worker that
    Ray Train restarted from a newer checkpoint skips what the steps since then took."""
    proportions, launched = loop_config["proportions"], loop_config.get("start_step", 0)

    def stream(k: int):  # a dataset whose share is 0 has no stream
        name = stream_name(k)
        if name not in loop_config["streams"]:
            return iter(())
        # Sized by the stream's share of a step: the first step waits for every stream's shuffle buffer,
        # so 4 steps' worth of each (not 4 whole batches of each) keeps the first batch quick.
        share = max(1, math.ceil(proportions[k] * per_worker))
        return ray.train.get_dataset_shard(name).iter_batches(
            batch_size=min(64, 2 * share), batch_format="numpy", local_shuffle_buffer_size=4 * share,
            local_shuffle_seed=cfg.data.shuffle_seed + 1000 * rank + 17 * k + launched)  # as the interrupted worker's

    return MixedBatches([stream(k) for k in range(len(proportions))], MixSchedule(proportions, per_worker), start_step=start,
                        streams_start=launched)


def worker_nodes(world: int) -> list:
    """The Ray node of every rank (the two-node checks read it)."""
    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_initialized() and world > 1):
        return [node]
    nodes = [None] * world
    dist.all_gather_object(nodes, node)
    return nodes


# -- the loop -------------------------------------------------------------------------------------------------


def _worker_setup(loop_config: dict) -> tuple[Config, str, StorageOptions, int, int, torch.device]:
    """``(config, run URI, storage options, rank, world size, device)`` of this worker, with its console
    (its lines on its stdout, which Ray shows on the driver's, at the driver's level) and retry window set."""
    logs.console()
    quiet_train_reports()
    cfg, run_uri = config_from_dict(loop_config["config"]), loop_config["run_uri"]
    options = StorageOptions.from_config(cfg)
    storage.set_retry_window(cfg.run.storage_retry_s)
    ctx = ray.train.get_context()
    check_shared_run_dir(run_uri, options)
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    use_tensor_cores(device)
    return cfg, run_uri, options, ctx.get_world_rank(), ctx.get_world_size(), device


def _resume(ckpt: CheckpointManager, launched_at: int) -> int:
    """Restore the newest intact checkpoint; returns its step (0: none). A checkpoint the driver
    launched from (``launched_at``) that turned out corrupt (now marked) stops the run: the driver
    planned the data streams (and skipped model.init_weights) for that step, and the same command
    plans them again from the newest intact one."""
    state = ckpt.load()
    start = state["step"] if state else 0
    if start < launched_at:
        raise ResumeError(f"the checkpoint this run was launched from (step {launched_at}) is corrupt and now marked "
                          f"CORRUPT.json; run the same command again to resume from the newest intact one "
                          f"({f'step {start}' if start else 'none: a fresh start'})")
    return start


def _optional_parts(cfg: Config, device: torch.device, options: StorageOptions):
    """``(decode, live_eval)``: the device JPEG decoder (``data.decode=device``) and the evaluator of the
    live teacher (``eval.every_steps``), each None when the config does not ask for it."""
    decode = live_eval = None
    if cfg.data.decode == "device":
        from hierdino.data.device_decode import (
            device_decoder,  # torchvision: only device-decoding runs need it
        )

        decode = device_decoder(cfg, device)
    if cfg.eval.every_steps:
        from hierdino.eval.live import (
            LiveEvaluator,  # scikit-learn: only runs that evaluate while training need it
        )

        live_eval = LiveEvaluator(cfg, options)
    return decode, live_eval


def train_loop_per_worker(loop_config: dict) -> dict:
    """Ray Train's per-worker function: set up, resume, step to ``train.steps`` (or a stop), export."""
    worker_start = time.perf_counter()
    cfg, run_uri, options, rank, world, device = _worker_setup(loop_config)
    metrics = TrainMetrics(cfg, run_uri, rank, worker_start, options)
    model = build_model(cfg, device, world, rank, resuming=loop_config.get("start_step", 0) > 0)
    # Identical initialisation on every rank above; from here each rank draws its own stochastic
    # depth (CPU and device generators; a resume restores both from the checkpoint).
    torch.manual_seed(cfg.train.seed * 1000 + rank + 2 ** 40)  # apart from the mask and augmentation seeds below
    step_fn = TrainStep(model, cfg)
    ckpt = CheckpointManager(model, step_fn.optimizer, rank, world, run_uri, cfg.checkpoint.keep, options,
                             every_steps=cfg.checkpoint.every_steps)
    start = step = _resume(ckpt, loop_config.get("start_step", 0))
    metrics.log.resume_at(start)  # records an interrupted attempt wrote after this checkpoint are logged again
    start_checksum = param_checksum(model.student)
    metrics.say(f"rank 0/{world} on {device}: {'resuming at step ' + str(start) if start else 'starting'}; "
                f"local parameter fraction {local_param_fraction(model.student):.3f}; {supervised_summary(model)}")
    per_worker, grid = cfg.train.batch_size // world, cfg.data.image_size // model.patch_size
    gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank + 7919 * start)  # host: masks
    device_gen = None if device.type == "cpu" else torch.Generator(device=device).manual_seed(gen.initial_seed() + 1)
    batches = open_batches(loop_config, cfg, rank, per_worker, start)
    decode, live_eval = _optional_parts(cfg, device, options)
    stop, last, eval_metrics = min(cfg.train.stop_at_step or cfg.train.steps, cfg.train.steps), {}, {}
    poller = StopPoller(loop_config.get("stop_flag"))
    metrics.begin()
    while step < stop:
        asked = poller.asked()  # a graceful stop: one worker stops after this step, several vote (TrainStep)
        if asked and world == 1:
            stop = min(stop, step + 1)
        batch = make_step_batch(metrics.next_batch(batches, step, per_worker, decode), cfg, gen, device, grid, device_gen)
        log_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == stop
        saving = ckpt.should_save(step + 1, stop)
        # Every read carries the collapse monitor, so a stop decided at a checkpoint step can log it.
        record = step_fn(batch, step, monitor=log_now or saving, sync=log_now or saving, stop_vote=asked)
        last = record or last
        step += 1
        if record is not None and record.pop("stop_votes", 0.0) > 0 and step < stop:
            stop, log_now, saving = step, True, True  # the same step on every rank: they read the same votes
        evaluating = live_eval is not None and step % cfg.eval.every_steps == 0
        if live_eval is not None and (evaluating or step == stop or (saving and not eval_metrics)):
            eval_metrics = live_eval(model.teacher["backbone"], device)
        last.update(eval_metrics)  # every report carries the latest external scores: Tune needs its metric in each
        if log_now:
            metrics.log_step(step, stop, last)
        if saving:
            # committed before Ray hears of it: a report never names a partial checkpoint
            ckpt.save(step, {"images_seen": step * cfg.train.batch_size})
            metrics.flush()
        if saving or evaluating:  # every rank: a report is a barrier
            ray.train.report(dict({k: v for k, v in last.items() if isinstance(v, float) and math.isfinite(v)}, step=step))
    metrics.close()
    export = (export_teacher(model, run_uri, rank, model.hierarchy.name, cfg.data.image_size, options,
                             cfg.data.center_crop) if step >= cfg.train.steps else None)
    return dict(last, step=step, start_step=start, images_per_s=metrics.images_per_s(), worker_nodes=worker_nodes(world),
                start_checksum=start_checksum, final_checksum=param_checksum(model.student), export=export,
                local_param_fraction=local_param_fraction(model.student), corrupt_images=metrics.corrupt.corrupt,
                ignored_internal_labels=model.ignored_internal_labels())
