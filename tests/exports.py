"""A tiny untrained model exported in a run directory's layout (``export/teacher_backbone.safetensors``
+ ``export/model.json``), for the tests that read exports."""

from __future__ import annotations

import json
from pathlib import Path


def write_tiny_export(run: Path, arch: str = "vit_micro_cpu", img_size: int = 64, seed: int = 1) -> Path:
    import torch
    from safetensors.torch import save_file

    from hierdino.models.backbone import build_backbone

    (run / "export").mkdir(parents=True)
    torch.manual_seed(seed)
    bb = build_backbone(arch, img_size)
    save_file({k.removeprefix("vit."): v.contiguous() for k, v in bb.state_dict().items() if k.startswith("vit.")},
              run / "export" / "teacher_backbone.safetensors")
    (run / "export" / "model.json").write_text(json.dumps({"arch": arch, "img_size": img_size}))
    return run
