"""Checkpoints: ``torch.distributed.checkpoint`` (DCP) written through fsspec to the run directory (a
local path or ``s3://`` alike), plus what DCP does not do.

``<run>/checkpoint_<step>/`` holds DCP's files (the model with its heads and centres, the optimiser),
``train_state_rank<r>.pt`` (step, images seen, RNG states), ``manifest_rank<r>.json`` (each file this
rank wrote: its size and the CRC-32 of every block, taken from the bytes as they were written) and,
last, rank 0's ``COMMITTED.json``. A checkpoint is *complete* when the marker, every manifest and
every listed size agree (``verify``); one interrupted while being written is skipped. A restore checks
every block it reads: changed bytes mark the checkpoint ``CORRUPT.json`` (kept for inspection) and
every rank restores the previous one. A commit prunes to ``checkpoint.keep``; a failed write (a full
disk, a store past ``run.storage_retry_s``) removes the partial checkpoint and says what to do.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from hierdino import storage
from hierdino.storage import StorageOptions
from hierdino.train import dcp_storage, rng
from hierdino.train.dcp_storage import CorruptCheckpoint, FileChecksums

logger = logging.getLogger(__name__)

COMMIT = "COMMITTED.json"
CORRUPT = "CORRUPT.json"  # written by a restore that found bytes changed since the commit
MARKED_CORRUPT = "marked corrupt by an earlier restore (kept for inspection until the run saves that step again)"
_NAME = re.compile(r"^checkpoint_(\d{7,})$")


def run_uri(cfg) -> str:
    """``<run.storage>/<run.name>``, local paths made absolute."""
    base = cfg.run.storage
    return storage.join(base if storage.is_s3(base) else str(Path(base).expanduser().absolute()), cfg.run.name)


def checkpoint_uri(run_uri: str, step: int) -> str:
    return storage.join(run_uri, f"checkpoint_{step:07d}")


class Incomplete(Exception):
    """Why a checkpoint cannot be used as it stands (not committed, a manifest missing or torn, ...)."""


def _field(uri: str, name: str, key: str, kind: type, options) -> tuple[dict, object]:
    """The JSON document ``name`` in ``uri`` and its ``key`` (a ``kind``; an int at least 1)."""
    try:
        doc = json.loads(storage.read_bytes(storage.join(uri, name), options))
        value = doc[key]
    except (ValueError, KeyError, TypeError) as e:  # bad JSON (UnicodeDecodeError too), no such key, not an object
        raise Incomplete(f"{name} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
        raise Incomplete(f"{name} is unreadable ({key!r} is {value!r})")
    return doc, value


def manifest_files(uri: str, options: StorageOptions | None = None) -> dict[str, FileChecksums]:
    """Every rank's files of the checkpoint at ``uri``, each checked present at its listed size;
    raises ``Incomplete`` saying why the checkpoint cannot be used."""
    sizes = storage.file_sizes(uri, options)
    if COMMIT not in sizes:
        raise Incomplete("no commit marker (interrupted while being written)")
    if CORRUPT in sizes:
        try:
            why = _field(uri, CORRUPT, "why", str, options)[1]
        except Incomplete as e:
            why = str(e)
        raise Incomplete(f"{MARKED_CORRUPT}: {why}")
    files = {}
    for rank in range(_field(uri, COMMIT, "world", int, options)[1]):
        name = f"manifest_rank{rank}.json"
        if name not in sizes:
            raise Incomplete(f"{name} is missing")
        manifest, listed = _field(uri, name, "files", dict, options)
        crcs, block = manifest.get("crc32"), manifest.get("crc_block", dcp_storage.CRC_BLOCK)
        for f, size in listed.items():
            if sizes.get(f) != size:
                raise Incomplete(f"{f} is {'missing' if f not in sizes else f'{sizes[f]} bytes, not {size}'}")
            file = files[f] = FileChecksums(size, crcs.get(f) if isinstance(crcs, dict) else None, block)
            if file.crcs is not None and not (isinstance(file.crcs, list) and isinstance(block, int) and block > 0
                                              and len(file.crcs) == -(-size // block)
                                              and all(isinstance(c, int) for c in file.crcs)):
                raise Incomplete(f"{name} is unreadable (the checksums of {f} do not fit its {size} bytes)")
    return files


def verify(uri: str, options: StorageOptions | None = None) -> str | None:
    """``None`` when the checkpoint at ``uri`` is complete, else why not (read from the store)."""
    try:
        manifest_files(uri, options)
    except Incomplete as e:
        return str(e)
    return None


@dataclass
class LatestCheckpoint:
    uri: str | None          # the newest complete checkpoint, or None
    step: int                # its step (0 when none)
    skipped: list[str]       # newer checkpoints that were not complete, with the reason


def checkpoint_steps(run_uri: str, options: StorageOptions | None = None) -> list[int]:
    """The steps of the run's checkpoint directories, newest first."""
    return sorted((int(m.group(1)) for d in storage.list_dirs(run_uri, options) if (m := _NAME.match(d))), reverse=True)


def latest_complete(run_uri: str, options: StorageOptions | None = None) -> LatestCheckpoint:
    """The newest complete checkpoint of the run at ``run_uri``."""
    skipped = []
    for step in checkpoint_steps(run_uri, options):
        why = verify(checkpoint_uri(run_uri, step), options)
        if why is None:
            return LatestCheckpoint(checkpoint_uri(run_uri, step), step, skipped)
        skipped.append(f"checkpoint_{step:07d}: {why}")
    return LatestCheckpoint(None, 0, skipped)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class CheckpointManager:
    """Owns what goes into a checkpoint, when one is written (``should_save``), how it is committed,
    and which one ``load`` restores (the newest intact one); the step is all of a run's position (the
    data's follows from it, see ``hierdino.data.mix``)."""

    def __init__(self, model, optimizer, rank: int, world: int, run_uri: str, keep: int,
                 options: StorageOptions | None = None, every_steps: int = 0):
        self.model, self.optimizer, self.rank, self.world = model, optimizer, rank, world
        self.run_uri, self.keep, self.options, self.every_steps = run_uri, keep, options, every_steps

    def should_save(self, step: int, stop: int) -> bool:
        """After ``step`` steps: every ``every_steps``, and at the last step of this run."""
        return step == stop or (self.every_steps > 0 and step % self.every_steps == 0)

    def save(self, step: int, train_state: dict | None = None) -> str:
        """Write, commit and prune (collective over ranks); ``train_state`` (counters to restore beside
        ``step``) goes into each rank's ``train_state_rank<r>.pt``. Returns the checkpoint's URI."""
        uri = checkpoint_uri(self.run_uri, step)
        if self.rank == 0:  # markers left by an earlier save of this step must not speak for the files written now
            for marker in (COMMIT, CORRUPT):
                storage.delete_file(storage.join(uri, marker), self.options)
        _barrier()
        try:
            manifest = self._write(uri, step, train_state)
        except (OSError, CheckpointException) as e:  # DCP's is a BaseException
            # the store's or the disk's (torch's zip writer says a failed write as a RuntimeError from its
            # inline_container); anything else is a bug, raised with its traceback
            if not all(isinstance(x, OSError) or "inline_container" in str(x) for x in _rank_errors(e)):
                raise
            raise self._write_failed(uri, _rank_errors(e)[0]) from None
        storage.write_bytes(storage.join(uri, f"manifest_rank{self.rank}.json"), json.dumps(manifest).encode(),
                            self.options)
        _barrier()  # every rank's files are stored
        if self.rank == 0:
            marker = {"step": step, "world": self.world, "time": time.time()}
            storage.write_bytes(storage.join(uri, COMMIT), json.dumps(marker).encode(), self.options)
            self._prune(step)
        _barrier()
        return uri

    def _write(self, uri: str, step: int, train_state: dict | None) -> dict:
        """This rank's DCP files and train state at ``uri``; returns its manifest."""
        store = dcp_storage.Store(uri, self.options)

        def save():  # collective: every rank meets the same failures (DCP gathers them) and all try again
            try:
                model, optim = get_state_dict(self.model, self.optimizer)
                dcp.save({"model": model, "optim": optim}, storage_writer=dcp_storage.Writer(store))
            except CheckpointException as e:  # a BaseException, which with_retries lets through unless transient
                transient = [x for x in _rank_errors(e) if storage.is_transient(x)]
                if transient:
                    raise transient[0] from None
                raise
        storage.with_retries(save, uri, "write", explain=False)  # other errors: _write_failed or a bug's traceback
        buf, name = io.BytesIO(), f"train_state_rank{self.rank}.pt"
        torch.save(dict(train_state or {}, step=step, rng=rng.capture()), buf)
        storage.write_bytes(storage.join(uri, name), buf.getvalue(), self.options)  # this rank's alone, retried alone
        store.written[name] = dcp_storage.BlockCrc(buf.getvalue())
        return {"step": step, "rank": self.rank, "world": self.world, "crc_block": dcp_storage.CRC_BLOCK,
                "files": {n: c.size for n, c in store.written.items()}, "crc32": {n: c.crcs for n, c in store.written.items()}}

    def _write_failed(self, uri: str, e: BaseException) -> storage.StorageError:
        """The error to stop the run with when this rank could not write its part of the checkpoint at
        ``uri`` (``e``): the partial checkpoint is removed (it would hold the space a retry needs) and
        the last complete one named; a full local disk says how much space a checkpoint takes."""
        with storage.retry_window(10):
            removed = "could not be removed (it is skipped on resume)"
            try:
                storage.delete_dir(uri, self.options)
            except OSError:  # another rank may have removed it first, or the store does not answer
                pass
            try:
                removed = removed if storage.exists(uri, self.options) else "was removed"
                last = latest_complete(self.run_uri, self.options).uri
                size = sum(f.size for f in manifest_files(last, self.options).values()) if last else 0
            except (OSError, Incomplete):
                last, size = "unknown (the store cannot be listed)", 0
        why = str(e) if isinstance(e, storage.StorageError) else f"cannot write checkpoint {uri}: {e}"
        advice = "Run the same command to resume once it can be written."
        if not storage.is_s3(uri):  # a full disk does not always say so (torch's writer: "unexpected pos ...")
            where = storage.resolve(self.run_uri)[1]
            free = shutil.disk_usage(where).free
            if free < size or getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
                advice = (f"{where} has {free / 2**20:.1f} MiB free" + (f", a checkpoint of this run takes "
                          f"{size / 2**20:.1f} MiB" if size else "") + ": free space there (or lower checkpoint.keep) "
                          "and run the same command to resume.")
        return storage.StorageError(f"{why}; the partial checkpoint {removed}; the last complete checkpoint is "
                                    f"{last or 'none'}. {advice}")

    def _prune(self, newest: int) -> None:
        """Keep the newest ``keep`` complete checkpoints; delete older ones and any debris older than
        ``newest``, but not those marked corrupt (they stay for a person to look at)."""
        kept = 0
        for step in (s for s in checkpoint_steps(self.run_uri, self.options) if s <= newest):
            uri = checkpoint_uri(self.run_uri, step)
            why = None if step == newest else verify(uri, self.options)
            if kept < self.keep and why is None:
                kept += 1
            elif why is None or not why.startswith(MARKED_CORRUPT):
                storage.delete_dir(uri, self.options)

    def load(self) -> dict | None:
        """Restore the newest complete checkpoint whose bytes match their checksums; returns its train
        state, or None when there is none. A corrupt one is marked and every rank goes on to the
        previous one: every rank checks every train state, and DCP gives every rank the errors any
        rank met reading its tensors."""
        for step in checkpoint_steps(self.run_uri, self.options):
            uri = checkpoint_uri(self.run_uri, step)
            try:
                return self._restore(uri, manifest_files(uri, self.options))
            except Incomplete as e:
                why = str(e)
            except (Exception, CheckpointException) as e:  # DCP's is a BaseException
                corrupt = next((x for x in _rank_errors(e) if isinstance(x, CorruptCheckpoint)), None)
                if corrupt is None:
                    raise
                why = f"corrupt: {corrupt}"
                if self.rank == 0:
                    storage.write_bytes(storage.join(uri, CORRUPT), json.dumps({"why": str(corrupt)}).encode(),
                                        self.options)
                self.optimizer.state.clear()  # the next restore sets every parameter's state again (or none)
            if self.rank == 0:
                logger.warning(f"skipped checkpoint_{step:07d}: {why}")
        return None

    def _restore(self, uri: str, files: dict[str, FileChecksums]) -> dict:
        """The train state of the checkpoint at ``uri``, restored into the model, optimiser and RNGs."""
        store = dcp_storage.Store(uri, self.options, files)
        states = {}
        for name in sorted(f for f in files if f.startswith("train_state_rank")):
            with store.create_stream(f"{store.root}/{name}", "rb") as f:
                states[name] = f.read()  # every block checked
        reader = dcp_storage.Reader(store)
        model, optim = get_state_dict(self.model, self.optimizer)
        saved = set(reader.read_metadata().state_dict_metadata)
        # Parameters never stepped (the frozen prototype layers early on) have no optimiser state; strict=False
        # below only for them (DCP's load refuses a model key the checkpoint lacks).
        optim["state"] = {k: v for k, v in optim["state"].items() if any(s.startswith(f"optim.state.{k}.") for s in saved)}
        dcp.load({"model": model, "optim": optim}, storage_reader=reader)
        set_state_dict(self.model, self.optimizer, model_state_dict=model, optim_state_dict=optim,
                       options=StateDictOptions(strict=False))
        own = f"train_state_rank{self.rank}.pt"
        # a pickle, as DCP's .metadata is; a larger world than the checkpoint's: rank 0's step and counters stand for all
        state = torch.load(io.BytesIO(states.get(own, states["train_state_rank0.pt"])), weights_only=False)
        saved_rng = state.pop("rng")
        rng.restore(saved_rng if own in states else None, int(state["step"]))  # a rank with no state: not rank 0's draws
        return dict(state, step=int(state["step"]), checkpoint=uri)


def _rank_errors(e: BaseException) -> list[BaseException]:
    """The errors behind ``e``: each failed rank's inside DCP's ``CheckpointException``, in rank order; else ``e``."""
    failures = getattr(e, "failures", None)  # rank -> (exception, traceback)
    if not isinstance(e, CheckpointException) or not failures:
        return [e]
    return [f[0] if isinstance(f, tuple) else f for _, f in sorted(failures.items())]

