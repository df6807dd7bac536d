"""The run's teacher export: what ``jobs/evaluate.py``, ``jobs/embed.py`` and timm users load.

``<run>/export/teacher_backbone.safetensors`` (timm key names), ``model.json`` (arch, the input
geometry it was trained on, the tree) and, for a run with a supervised head, the head and its tree
(``hierdino.models.head_export``).
"""

from __future__ import annotations

import json

import safetensors.torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from hierdino import storage
from hierdino.archs import TINY_ARCHS
from hierdino.data.augment import IMAGENET_MEAN, IMAGENET_STD
from hierdino.models.head_export import write_head


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
