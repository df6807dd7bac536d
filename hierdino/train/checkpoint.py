"""Checkpoints: ``torch.distributed.checkpoint`` shards inside Ray checkpoints, and the teacher export.

A checkpoint directory holds the DCP shards of the model (student, teacher, supervised head,
centres) and the optimiser, plus ``train_state_rank{r}.pt`` per rank (step, data epoch, images
seen, RNG states). Ray keeps the last ``checkpoint.keep`` and hands the latest back after a
worker failure or when a run of the same name is started again.
"""

from __future__ import annotations

import json
import os
import random
import tempfile

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict,
)

from hierdino.data import storage


class CheckpointManager:
    """Owns what goes into a checkpoint; the loop calls ``save(step, ...)`` and ``load()``."""

    def __init__(self, model, optimizer, rank: int):
        self.model, self.optimizer, self.rank = model, optimizer, rank

    def _app_state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, step: int, train_state: dict, metrics: dict) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="hierdino-ckpt-") as tmp:
            dcp.save(self._app_state(), checkpoint_id=tmp)
            state = dict(train_state, step=step, rng=_rng_state())
            torch.save(state, os.path.join(tmp, f"train_state_rank{self.rank}.pt"))
            ray.train.report(dict(metrics, step=step), checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{step:07d}")

    def load(self) -> dict | None:
        """Restore from Ray's latest checkpoint; returns its train state, or None when there is none."""
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            app = self._app_state()
            saved = set(dcp.FileSystemReader(d).read_metadata().state_dict_metadata)
            missing = [k for k in app["model"] if f"model.{k}" not in saved]
            if missing:
                raise RuntimeError(f"checkpoint {d} does not match the model: {len(missing)} missing tensors, e.g. {missing[:5]}")
            # Parameters never stepped (the frozen prototype layers early on) have no optimiser state.
            for fqn in [f for f in app["optim"]["state"] if not any(k.startswith(f"optim.state.{f}.") for k in saved)]:
                del app["optim"]["state"][fqn]
            dcp.load(app, checkpoint_id=d)
            # strict=False only for that optimiser state: the model's keys were checked above.
            set_state_dict(self.model, self.optimizer, model_state_dict=app["model"], optim_state_dict=app["optim"],
                           options=StateDictOptions(strict=False))
            path = os.path.join(d, f"train_state_rank{self.rank}.pt")
            if not os.path.exists(path):  # a different world size: rank 0's state stands for all
                path = os.path.join(d, "train_state_rank0.pt")
            state = torch.load(path, weights_only=True)
        _set_rng_state(state.pop("rng"))
        return state


def _rng_state() -> dict:
    """RNG states as tensors and plain values, so ``torch.load(weights_only=True)`` reads them back."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(s["python"][:1]) + (tuple(s["python"][1]),) + tuple(s["python"][2:]))


def export_teacher(model, run_uri: str, rank: int, hierarchy_name: str, image_size: int) -> str | None:
    """Write the teacher backbone as timm-format safetensors plus ``model.json``; collective over ranks."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model.teacher["backbone"], options=opts)
    if rank != 0:
        return None
    from safetensors.torch import save

    backbone = model.student["backbone"]
    tensors = {k.removeprefix("vit."): v.float().contiguous() for k, v in sd.items() if k.startswith("vit.")}
    uri = storage.join(run_uri, "export", "teacher_backbone.safetensors")
    storage.write_bytes(uri, save(tensors))
    from hierdino.models.backbone import TINY_ARCHS

    info = {
        "arch": backbone.arch, "img_size": image_size, "patch_size": backbone.patch_size,
        "embed_dim": backbone.embed_dim, "depth": len(backbone.blocks), "hierarchy": hierarchy_name,
        "timm_kwargs": {"img_size": image_size, "num_classes": 0, "dynamic_img_size": True},
        "tiny_arch": TINY_ARCHS.get(backbone.arch),
        "weights": "teacher_backbone.safetensors",
    }
    storage.write_bytes(storage.join(run_uri, "export", "model.json"), json.dumps(info, indent=2).encode())
    return uri
