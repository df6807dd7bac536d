"""Checkpoints: ``torch.distributed.checkpoint`` shards written to the run directory, committed
atomically, and the teacher export.

``<run>/checkpoint_<step>/`` holds the DCP shards of the model (student, teacher, supervised head,
centres) and the optimiser, ``train_state_rank{r}.pt`` per rank (step, data epoch, images seen, RNG
states), ``manifest_rank{r}.json`` per rank (its files and their sizes, written after them) and,
last, ``COMMITTED.json`` from rank 0 once every rank's files are stored. A checkpoint is used only
when it is complete, which is checked by reading: the marker, every rank's manifest, and every
listed file at its listed size (``verify``). One interrupted while being written (a worker or the
driver killed, the store failing) is skipped, and the run resumes from the previous complete one;
older checkpoints are deleted only after a newer one is committed (``checkpoint.keep``).

The manifests also hold a CRC-32 of every 16 MiB block of each file, computed from the bytes as
written. A restore checks each block it reads (a rank restoring from a store fetches whole blocks
for that): bytes changed since (a disk or copy error, an edit) make the checkpoint corrupt, named,
and the run restores the previous complete one instead.

Every write and read goes through ``hierdino.storage``, which retries a store that stops
answering for ``run.storage_retry_s`` seconds.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from hierdino import storage
from hierdino.archs import TINY_ARCHS
from hierdino.data.augment import IMAGENET_MEAN, IMAGENET_STD
from hierdino.models.head_export import write_head
from hierdino.storage import StorageOptions

COMMIT = "COMMITTED.json"
CORRUPT = "CORRUPT.json"  # written by a restore that found bytes changed since the commit
MARKED_CORRUPT = "marked corrupt by an earlier restore (kept for inspection until the run saves that step again)"
_NAME = re.compile(r"^checkpoint_(\d{7,})$")


def run_uri(cfg) -> str:
    """``<run.storage>/<run.name>``, local paths made absolute."""
    base = cfg.run.storage
    if not storage.is_s3(base):
        base = str(Path(base).expanduser().absolute())
    return storage.join(base, cfg.run.name)


def checkpoint_uri(run_uri: str, step: int) -> str:
    return storage.join(run_uri, f"checkpoint_{step:07d}")


def verify(uri: str, options: StorageOptions | None = None) -> str | None:
    """``None`` when the checkpoint at ``uri`` is complete, else why not (read from the store). A marker
    or manifest that cannot be read (empty or torn by a crash, edited) makes it incomplete too."""
    try:
        _files(uri, options)
    except _Unreadable as e:
        return str(e)
    return None


CRC_BLOCK = 16 << 20


@dataclass
class _File:
    size: int
    crcs: list[int] | None   # CRC-32 of each ``block``-byte block, as written (None: written before checksums)
    block: int = CRC_BLOCK


def _files(uri: str, options: StorageOptions | None = None) -> dict[str, _File]:
    """Every rank's files of the checkpoint at ``uri`` from its manifests, each checked present at its
    listed size; raises ``_Unreadable`` saying why the checkpoint is not complete."""
    sizes = storage.file_sizes(uri, options)
    if COMMIT not in sizes:
        raise _Unreadable("no commit marker (interrupted while being written)")
    if CORRUPT in sizes:
        try:
            why = json.loads(storage.read_bytes(storage.join(uri, CORRUPT), options))["why"]
        except (ValueError, KeyError, TypeError):
            why = "?"
        raise _Unreadable(f"{MARKED_CORRUPT}: {why}")

    def read(name: str, key: str, kind: type) -> tuple[dict, object]:
        try:
            doc = json.loads(storage.read_bytes(storage.join(uri, name), options))
            value = doc[key]
        except (ValueError, KeyError, TypeError) as e:  # bad JSON (UnicodeDecodeError too), a missing key, not an object
            raise _Unreadable(f"{name} is unreadable ({type(e).__name__}: {e})") from None
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
            raise _Unreadable(f"{name} is unreadable ({key!r} is {value!r})")
        return doc, value

    files = {}
    for rank in range(read(COMMIT, "world", int)[1]):
        name = f"manifest_rank{rank}.json"
        if name not in sizes:
            raise _Unreadable(f"{name} is missing")
        manifest, listed = read(name, "files", dict)
        crcs, block = manifest.get("crc32", {}), manifest.get("crc_block", CRC_BLOCK)
        for f, size in listed.items():
            if sizes.get(f) != size:
                raise _Unreadable(f"{f} is {'missing' if f not in sizes else f'{sizes[f]} bytes, not {size}'}")
            file = _File(size, crcs.get(f) if isinstance(crcs, dict) else None, block)
            if file.crcs is not None and not (isinstance(block, int) and block > 0 and isinstance(file.crcs, list)
                                              and len(file.crcs) == -(-size // block)):
                raise _Unreadable(f"{name} is unreadable (the checksums of {f} do not fit its {size} bytes)")
            files[f] = file
    return files


class _Unreadable(Exception):
    pass


class CorruptCheckpoint(Exception):
    """A checkpoint file's bytes differ from the checksums its manifest recorded when it was written."""


def block_crcs(path: str, block: int = CRC_BLOCK) -> list[int]:
    """CRC-32 of each ``block``-byte block of the file at ``path`` (the last one shorter)."""
    crcs = []
    with open(path, "rb") as f:
        while data := f.read(block):
            crcs.append(zlib.crc32(data))
    return crcs


@dataclass
class Found:
    uri: str | None          # the newest complete checkpoint, or None
    step: int                # its step (0 when none)
    skipped: list[str]       # newer checkpoints that were not complete, with the reason


def _steps(run_uri: str, options: StorageOptions | None = None) -> list[int]:
    """The steps of the run's checkpoint directories, newest first."""
    return sorted((int(m.group(1)) for d in storage.list_dirs(run_uri, options) if (m := _NAME.match(d))), reverse=True)


def _scan(run_uri: str, options: StorageOptions | None = None):
    """``(step, uri, files or None, None or why it is not complete)`` of each checkpoint of the run,
    newest first (``files``: what ``_files`` read of its manifests)."""
    for step in _steps(run_uri, options):
        uri = checkpoint_uri(run_uri, step)
        try:
            yield step, uri, _files(uri, options), None
        except _Unreadable as e:
            yield step, uri, None, str(e)


def latest_complete(run_uri: str, options: StorageOptions | None = None) -> Found:
    """The newest complete checkpoint of the run at ``run_uri`` (checked by ``verify``)."""
    skipped = []
    for step, uri, _, why in _scan(run_uri, options):
        if why is None:
            return Found(uri, step, skipped)
        skipped.append(f"checkpoint_{step:07d}: {why}")
    return Found(None, 0, skipped)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class CheckpointManager:
    """Owns what goes into a checkpoint, when one is written (``should_save``), how it is committed,
    and the run's progress (``state``: steps done and images seen; the data position follows from
    the step, see ``hierdino.data.mix``), restored by ``load`` from the newest complete checkpoint."""

    def __init__(self, model, optimizer, rank: int, world: int, run_uri: str, keep: int,
                 options: StorageOptions | None = None, every_steps: int = 0):
        self.model, self.optimizer, self.rank, self.world = model, optimizer, rank, world
        self.run_uri, self.keep, self.options, self.every_steps = run_uri, keep, options, every_steps
        self.state = {"step": 0, "images_seen": 0}

    def should_save(self, step: int, stop: int) -> bool:
        """After ``step`` steps: every ``every_steps``, and at the last step of this run."""
        return step == stop or (self.every_steps > 0 and step % self.every_steps == 0)

    def advance(self, images: int) -> None:
        """One step done on ``images`` images (the global batch)."""
        self.state["step"] += 1
        self.state["images_seen"] += images

    def _app_state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, step: int, train_state: dict | None = None) -> str:
        """Write, commit and prune (collective over ranks); returns the checkpoint's URI.

        Local run directories are written in place; object stores get the shards from a local
        temporary directory, each file uploaded with retries.
        """
        uri = checkpoint_uri(self.run_uri, step)
        local = not storage.is_s3(uri)
        if self.rank == 0:  # markers left by an earlier save of this step must not speak for the files written now
            for marker in (COMMIT, CORRUPT):
                storage.delete_file(storage.join(uri, marker), self.options)
        _barrier()
        try:
            self._write(uri, step, local, train_state)
        except (OSError, CheckpointException) as e:  # DCP's is a BaseException
            # the store's or the disk's (torch's zip writer says a failed write as a RuntimeError from its
            # inline_container); anything else is a bug, raised with its traceback
            if not all(isinstance(x, OSError) or "inline_container" in str(x) for x in _rank_errors(e)):
                raise
            raise self._write_failed(uri, e) from None
        _barrier()  # every rank's files are stored
        if self.rank == 0:
            marker = {"step": step, "world": self.world, "time": time.time()}
            storage.write_bytes(storage.join(uri, COMMIT), json.dumps(marker).encode(), self.options)
            self._prune(step)
        _barrier()
        return uri

    def _write(self, uri: str, step: int, local: bool, train_state: dict | None) -> None:
        """This rank's shards, train state and manifest of the checkpoint at ``uri`` (``local``: in place)."""
        with tempfile.TemporaryDirectory(prefix="hierdino-ckpt-") as tmp:
            target = storage.resolve(uri)[1] if local else tmp
            os.makedirs(target, exist_ok=True)
            dcp.save(self._app_state(), checkpoint_id=target)
            state = dict(self.state if train_state is None else train_state, step=step, rng=_rng_state())
            torch.save(state, os.path.join(target, f"train_state_rank{self.rank}.pt"))
            mine = [n for n in sorted(os.listdir(target)) if n.startswith(f"__{self.rank}_")
                    or n == f"train_state_rank{self.rank}.pt" or (n == ".metadata" and self.rank == 0)]
            files, crcs = {}, {}
            for name in mine:
                path = os.path.join(target, name)
                crcs[name] = block_crcs(path, CRC_BLOCK)  # before the upload: the bytes this process wrote
                if not local:
                    storage.upload_file(path, storage.join(uri, name), self.options)
                files[name] = os.path.getsize(path)
                _fault_hook("HIERDINO_TEST_KILL_IN_CHECKPOINT", step)  # test-only: die with this checkpoint half written
        manifest = {"step": step, "rank": self.rank, "world": self.world, "files": files, "crc32": crcs,
                    "crc_block": CRC_BLOCK}
        storage.write_bytes(storage.join(uri, f"manifest_rank{self.rank}.json"), json.dumps(manifest).encode(), self.options)

    def _write_failed(self, uri: str, e: BaseException) -> storage.StorageError:
        """The error to stop the run with when this rank could not write its part of the checkpoint at
        ``uri`` (a full disk, a store past its retry window, ...): the partial checkpoint is removed
        (never loadable; it would hold the space a retry needs) and the last complete one named."""
        e = _rank_errors(e)[0]
        with storage.retry_window(10):
            try:
                storage.delete_dir(uri, self.options)
                removed = "the partial checkpoint was removed"
            except OSError:  # another rank may have removed it first
                removed = ("the partial checkpoint was removed" if not storage.exists(uri, self.options) else
                           "the partial checkpoint could not be removed (it is skipped on resume)")
            try:
                last = latest_complete(self.run_uri, self.options).uri
                size = sum(f.size for f in _files(last, self.options).values()) if last else 0
            except (OSError, _Unreadable):
                last, size = "unknown (the store cannot be listed)", 0
        why = str(e) if isinstance(e, storage.StorageError) else f"cannot write checkpoint {uri}: {e}"
        space = ""
        if not storage.is_s3(uri):  # a full disk does not always say so (torch's writer: "unexpected pos ...")
            free = shutil.disk_usage(storage.resolve(self.run_uri)[1]).free
            if free < size or getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
                space = f"{storage.resolve(self.run_uri)[1]} has {free / 2**20:.1f} MiB free"
                space += f", a checkpoint of this run takes {size / 2**20:.1f} MiB" if size else ""
        return storage.StorageError(
            f"{why}; {removed}; the last complete checkpoint is {last or 'none'}. "
            + (f"{space}: free space there (or lower checkpoint.keep) and run the same command to resume."
               if space else "Run the same command to resume once it can be written."))

    def _prune(self, newest: int) -> None:
        """Keep the newest ``keep`` committed checkpoints; delete older ones and any debris older than
        ``newest``, but not those marked corrupt."""
        kept = 0
        for step in _steps(self.run_uri, self.options):
            if step > newest:
                continue
            uri = checkpoint_uri(self.run_uri, step)
            why = None if step == newest else verify(uri, self.options)
            if kept < self.keep and why is None:
                kept += 1
            elif why is None or not why.startswith(MARKED_CORRUPT):  # a corrupt one stays for a person to look at
                storage.delete_dir(uri, self.options)

    def load(self, log=print) -> dict | None:
        """Restore the newest complete checkpoint whose bytes match their checksums; returns its train
        state, or None when there is none. A corrupt one (found by any rank) is marked (``CORRUPT``,
        kept for inspection, skipped from then on) and every rank goes on to the previous one."""
        for step, uri, files, why in _scan(self.run_uri, self.options):
            if why is None:
                try:
                    return self._agreed(self._restore(uri, files, log))
                except CorruptCheckpoint as e:
                    why = f"corrupt: {e}"
                    if self.rank == 0:
                        storage.write_bytes(storage.join(uri, CORRUPT), json.dumps({"why": str(e)}).encode(), self.options)
                    self.optimizer.state.clear()  # the next restore sets every parameter's state again (or none)
            if self.rank == 0:
                log(f"[hierdino] skipped checkpoint_{step:07d}: {why}")
        return None

    def _agreed(self, outcome):
        """``outcome`` (a train state or the exception this rank met restoring) once every rank has
        said how its restore went: the same corrupt checkpoint is skipped by all of them, and a rank's
        other error stops all of them (none is left waiting in a collective)."""
        mine = None
        if isinstance(outcome, BaseException):
            corrupt = _corruption(outcome)
            mine = ("corrupt", str(corrupt)) if corrupt else ("error", f"{type(outcome).__name__}: {outcome}")
        said = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            said = [None] * dist.get_world_size()
            dist.all_gather_object(said, mine)
        if isinstance(outcome, BaseException) and mine[0] == "error":
            raise outcome
        for rank, s in enumerate(said):
            if s is not None and s[0] == "error":
                raise RuntimeError(f"rank {rank} could not restore the checkpoint: {s[1]}")
        corrupt = next((s[1] for s in said if s is not None), None)
        if corrupt is not None:
            raise CorruptCheckpoint(corrupt)
        return outcome

    def _restore(self, uri: str, files: dict[str, _File], log):
        """The train state of the checkpoint at ``uri`` restored into the model and optimiser, or the
        exception that stopped it (returned: ``_agreed`` decides with the other ranks)."""
        try:
            with _restore_source(uri, files, self.options) as reader:
                app = self._app_state()
                saved = set(reader.read_metadata().state_dict_metadata)
                missing = [k for k in app["model"] if f"model.{k}" not in saved]
                gains = [k for k in missing if k.endswith("last_layer.weight_g")]
                if gains:  # written before the heads trained their prototype gains: they stay at 1, the old heads' logits
                    for k in gains:
                        del app["model"][k]
                    missing = [k for k in missing if k not in gains]
                    if self.rank == 0:
                        log(f"[hierdino] {uri} has no prototype gains (written before they were trained): they start at 1")
                if missing:
                    raise RuntimeError(f"checkpoint {uri} does not match the model: {len(missing)} missing tensors, "
                                       f"e.g. {missing[:5]}")
                # Parameters never stepped (the frozen prototype layers early on) have no optimiser state.
                for fqn in [f for f in app["optim"]["state"] if not any(k.startswith(f"optim.state.{f}.") for k in saved)]:
                    del app["optim"]["state"][fqn]
                dcp.load(app, storage_reader=reader)
                # strict=False only for that optimiser state: the model's keys were checked above.
                set_state_dict(self.model, self.optimizer, model_state_dict=app["model"], optim_state_dict=app["optim"],
                               options=StateDictOptions(strict=False))
                own = f"train_state_rank{self.rank}.pt" in files
                # a larger world than the checkpoint's: rank 0's step and counters stand for all
                state = torch.load(reader.fetch(f"train_state_rank{self.rank if own else 0}.pt"), weights_only=True)
        except (Exception, CheckpointException) as e:  # DCP's is a BaseException
            return e
        rng = state.pop("rng")
        if own:
            _set_rng_state(rng)
        else:  # not rank 0's generators (this rank would draw rank 0's stochastic depth): its own seed, moved on
            torch.manual_seed(torch.initial_seed() + int(state["step"]))
        self.state = {"step": int(state["step"]), "images_seen": int(state.get("images_seen", 0))}
        state["checkpoint"] = uri
        return state


def _rank_errors(e: BaseException) -> list[BaseException]:
    """The errors behind ``e``: each failed rank's inside DCP's ``CheckpointException``, in rank order; else ``e``."""
    failures = getattr(e, "failures", None)  # rank -> (exception, traceback)
    if not isinstance(e, CheckpointException) or not failures:
        return [e]
    return [f[0] if isinstance(f, tuple) else f for _, f in sorted(failures.items())]


def _corruption(e: BaseException) -> CorruptCheckpoint | None:
    """The ``CorruptCheckpoint`` behind ``e``: itself, or one a rank raised inside DCP's collective read."""
    return next((x for x in _rank_errors(e) if isinstance(x, CorruptCheckpoint)), None)


class _Reader(dcp.FileSystemReader):
    """DCP's file reader over a local directory holding the checkpoint at ``uri``, checking every block
    of bytes it reads against the checksums the manifests recorded when they were written
    (``CorruptCheckpoint`` names the file and bytes that differ). ``remote``: the checkpoint is in an
    object store and ``local_dir`` a temporary directory into which a read first copies the blocks it
    needs (sparse files); else ``local_dir`` is the checkpoint's own directory (read in place). A rank
    thus fetches the metadata and its own tensors' blocks (about half the shards of a 2-rank checkpoint
    on each of 2 ranks, all of them on one rank), not the whole checkpoint: that on every rank would be
    N times the checkpoint in traffic and local disk."""

    def __init__(self, local_dir: str, uri: str, files: dict[str, _File], remote: bool = False,
                 options: StorageOptions | None = None):
        super().__init__(local_dir)
        self.local_dir, self.uri, self.files, self.remote, self.options = local_dir, uri, files, remote, options
        self.fetched: dict[str, set[tuple[int, int]]] = {}  # file -> byte ranges copied so far
        self.checked: dict[str, set[int]] = {}  # file -> blocks whose checksum matched

    def _need(self, name: str, ranges) -> str:
        """The local path of file ``name`` with its byte ranges ``[(offset, length)]`` copied (from a
        store) and checked; a file with checksums is read in whole blocks."""
        path, f = os.path.join(self.local_dir, name), self.files.get(name)
        blocks = []
        if f is not None and f.crcs is not None:
            done = self.checked.setdefault(name, set())
            blocks = sorted({b for off, n in ranges for b in range(off // f.block, -(-(off + n) // f.block))} - done)
            ranges = [(b * f.block, min(f.block, f.size - b * f.block)) for b in blocks]
        if self.remote:
            new = sorted(set(ranges) - self.fetched.setdefault(name, set()))
            if new:
                storage.download_ranges(storage.join(self.uri, name), path, new, self.options)
                self.fetched[name] |= set(new)
        if blocks:
            with open(path, "rb") as src:
                for b in blocks:
                    src.seek(b * f.block)
                    data = src.read(f.block)
                    if zlib.crc32(data) != f.crcs[b]:
                        raise CorruptCheckpoint(f"{storage.join(self.uri, name)}: bytes {b * f.block}-"
                                                f"{b * f.block + len(data) - 1} differ from when they were written "
                                                f"(CRC-32 {zlib.crc32(data):08x}, the manifest's {f.crcs[b]:08x})")
                    done.add(b)
        return path

    def fetch(self, name: str) -> str:
        """The local path of the checkpoint's whole file ``name``, copied from a store and checked."""
        f = self.files.get(name)
        if f is None and self.remote and not os.path.exists(os.path.join(self.local_dir, name)):
            storage.download_file(storage.join(self.uri, name), os.path.join(self.local_dir, name), self.options)
        return self._need(name, [(0, f.size)]) if f is not None else os.path.join(self.local_dir, name)

    def read_metadata(self, *args, **kwargs):
        self.fetch(".metadata")
        return super().read_metadata(*args, **kwargs)

    def read_data(self, plan, planner):
        wanted: dict[str, set[tuple[int, int]]] = {}
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            wanted.setdefault(info.relative_path, set()).add((info.offset, info.length))
        for name, ranges in sorted(wanted.items()):
            self._need(name, sorted(ranges))
        return super().read_data(plan, planner)


@contextlib.contextmanager
def _restore_source(uri: str, files: dict[str, _File], options=None):
    """A ``_Reader`` of the checkpoint at ``uri``: in place, or over a temporary download directory."""
    if not storage.is_s3(uri):
        yield _Reader(storage.resolve(uri, options)[1], uri, files)
        return
    with tempfile.TemporaryDirectory(prefix="hierdino-restore-") as d:
        yield _Reader(d, uri, files, remote=True, options=options)


def _fault_hook(var: str, step: int) -> None:
    """Test-only fault injection: ``VAR=<step>`` kills this process (SIGKILL, as the OOM killer or a
    node loss would) at that step, once per run directory (a marker file under ``VAR_DIR``)."""
    at = os.environ.get(var)
    if at is None or int(at) != step:
        return
    marker = os.path.join(os.environ.get(f"{var}_DIR", tempfile.gettempdir()), f"{var}.{step}.done")
    if os.path.exists(marker):
        return
    storage.write_bytes(marker, b"")  # durable before the kill below
    os.kill(os.getpid(), 9)


def _rng_state() -> dict:
    """RNG states as tensors and plain values, so ``torch.load(weights_only=True)`` reads them back;
    on a GPU also the current device's generator (drop-path draws)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():  # a CPU checkpoint resumed on a GPU keeps the seeded state
        torch.cuda.set_rng_state(s["cuda"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(s["python"][:1]) + (tuple(s["python"][1]),) + tuple(s["python"][2:]))


def export_teacher(model, run_uri: str, rank: int, hierarchy_name: str, image_size: int, options=None,
                   center_crop: float = 1.0) -> str | None:
    """Write the teacher backbone as timm-format safetensors plus ``model.json`` (with the input
    geometry it was trained on: size and centred share of each side); collective over ranks."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model.teacher["backbone"], options=opts)
    head = model.sup_head
    head_sd = get_model_state_dict(head, options=opts) if head is not None else None  # collective, like the above
    if rank != 0:
        return None
    backbone = model.student["backbone"]
    tensors = {k.removeprefix("vit."): v.float().contiguous() for k, v in sd.items() if k.startswith("vit.")}
    uri = storage.join(run_uri, "export", "teacher_backbone.safetensors")
    storage.write_bytes(uri, safetensors.torch.save(tensors), options)
    info = {
        "arch": backbone.arch, "img_size": image_size, "center_crop": center_crop, "patch_size": backbone.patch_size,
        "embed_dim": backbone.embed_dim, "depth": len(backbone.blocks), "hierarchy": hierarchy_name,
        "timm_kwargs": {"img_size": image_size, "num_classes": 0, "dynamic_img_size": True},
        "tiny_arch": TINY_ARCHS.get(backbone.arch),
        "weights": "teacher_backbone.safetensors",
    }
    if head_sd is not None:  # the supervised head, its tree and the preprocessing: what predictions need
        info["head"] = write_head(storage.join(run_uri, "export"), head_sd["linear.weight"], head_sd["linear.bias"],
                                  model.hierarchy, {"img_size": image_size, "center_crop": center_crop,
                                                    "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                                  options).rsplit("/", 1)[-1]
    storage.write_bytes(storage.join(run_uri, "export", "model.json"), json.dumps(info, indent=2).encode(), options)
    return uri
