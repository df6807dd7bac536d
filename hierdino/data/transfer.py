"""Host-to-device transfers that never make the host wait for the device.

A copy from pageable host memory to a GPU, or a tensor built from Python or NumPy data on it, blocks
the host until the GPU has run every kernel queued before it: the host could then not queue the
next step while the GPU runs this one. ``to_device`` stages host tensors in pinned memory and copies
asynchronously; ``select_rows`` picks rows with a host mask without handing the mask to the device.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> ``device`` without blocking the host: through pinned memory on a GPU."""
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def select_rows(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of ``t`` (on any device) where the host bool ``mask`` holds (``t`` itself, no copy,
    when it holds everywhere). Indexing a device tensor with a host mask would copy the mask's
    indices over synchronously; here they go through ``to_device``."""
    if bool(mask.all()):  # a host read: free
        return t
    if t.device.type == "cpu":
        return t[mask]
    return t.index_select(0, to_device(mask.nonzero().squeeze(1), t.device))
