"""Decode and crop on the training device (``data.decode: device``): the Ray Data tasks only parse
each image's header and plan its views (``hierdino.data.crops.plan_views``, the same boxes and flips
the CPU path draws from the same seed) and ship the encoded bytes; the worker decodes the batch with
nvJPEG on a GPU (``torchvision.io.decode_jpeg``; other formats and CPU devices decode with
torchvision on the host) and cuts every view of one output size in one ``roi_align`` call.

Resampling differs from the CPU path in kind, not in geometry: ``roi_align`` averages
``ceil(box / size)`` bilinear samples per output pixel per side (an area filter when shrinking,
bilinear when enlarging), where PIL uses an antialiased bicubic. The crop statistics of both paths
are compared in ``tests/test_data_plane.py``.

Rows come as ``jpeg`` (encoded bytes), ``boxes`` (float ``[n, V, 4]`` source pixels) and
``flags`` (bool ``[n, V, 3]``: left-right flip, top-bottom flip, rot90), with V = 2 global views, the
local views, then the supervised view when the run has one.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.ops import roi_align

from hierdino.data import crops
from hierdino.data.transfer import to_device

_JPEG = b"\xff\xd8"


def decode_batch(blobs, device: torch.device) -> tuple[list[torch.Tensor | None], np.ndarray]:
    """RGB uint8 ``[3, H, W]`` per image on ``device`` (None where undecodable or ``None``) and the ok mask.

    JPEGs on a CUDA device decode in one batched nvJPEG call; when that call fails (a corrupt file
    among them) they decode one by one, so one bad image costs only itself, and what nvJPEG refuses
    is decoded on the host as the CPU path would.
    """
    tensors = [None if b is None else torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    out: list[torch.Tensor | None] = [None] * len(tensors)
    jpeg = [i for i, b in enumerate(blobs) if b is not None and bytes(b[:2]) == _JPEG] if device.type == "cuda" else []
    if jpeg:
        with _nvjpeg_stream(device, out):
            try:
                for i, im in zip(jpeg, decode_jpeg([tensors[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)):
                    out[i] = im
            except RuntimeError:
                for i in jpeg:
                    try:
                        out[i] = decode_jpeg(tensors[i], mode=ImageReadMode.RGB, device=device)
                    except RuntimeError:
                        pass  # corrupt, or a JPEG nvJPEG does not take (CMYK, YCCK): the host tries below
    for i, t in enumerate(tensors):  # other formats, what nvJPEG refused, and every image on a CPU device
        if t is not None and out[i] is None:
            out[i] = _decode_host(t, blobs[i], device)
    return out, np.array([im is not None for im in out], bool)


def _decode_host(t: torch.Tensor, blob, device: torch.device) -> torch.Tensor | None:
    """One image decoded on the host: torchvision for what it reads (16-bit PNG keeps its top byte,
    as ``crops.to_8bit``), PIL for the rest (TIFF, BMP: the CPU path's decoder); None if neither can."""
    try:
        im = decode_image(t, mode=ImageReadMode.RGB)
        if im.dtype != torch.uint8:  # 16-bit PNG
            im = (im.to(torch.int32) >> (8 * im.element_size() - 8)).to(torch.uint8)
    except RuntimeError:
        try:
            im = torch.from_numpy(np.array(crops.decode(bytes(blob)))).permute(2, 0, 1)
        except Exception:  # PIL raises many types for broken files
            return None
    return to_device(im, device)


_SIDE_STREAMS: dict = {}


@contextlib.contextmanager
def _nvjpeg_stream(device: torch.device, out: list):
    """Allocate nvJPEG's outputs where no queued kernel can still be using the memory.

    torchvision's nvJPEG decoder writes on a stream of its own, ordered after nothing, into outputs
    allocated on the *current* stream. On the training stream the caching allocator hands out
    blocks that a step still queued on the device (the host runs ahead: no sync between log steps)
    reads or writes, so the decoder would overwrite live activations or gradients (seen on an H200
    as non-finite gradients within 5 steps). Here the outputs come from a stream used only for
    decoding, the training stream waits for it, and each output is recorded on the training stream,
    so its block returns to the decode pool only once the kernels queued before its release ran.
    """
    main = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.setdefault(device, torch.cuda.Stream(device))
    with torch.cuda.stream(side):
        yield
    main.wait_stream(side)
    for im in out:
        if im is not None and im.is_cuda:
            im.record_stream(main)


def _by_size(images: list, rows: np.ndarray) -> list[tuple[np.ndarray, torch.Tensor]]:
    """The decoded images of ``rows`` grouped by size: (rows, float ``[n, 3, H, W]``) per size. Padding
    a batch to its largest image would cost memory for the largest image times the batch (one
    2048 px image among 256 small ones: 13 GB in float32); ``roi_align`` reads each group as it is
    (its samples at a box edge clamp to the image's border)."""
    sizes: dict[tuple, list[int]] = {}
    for r in rows:
        sizes.setdefault(tuple(images[r].shape[1:]), []).append(int(r))
    return [(np.array(rs), torch.stack([images[r] for r in rs]).float()) for rs in sizes.values()]


def _apply_flags(x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Per-view left-right flip, top-bottom flip, then rot90 (counter-clockwise), as ``crops.render``."""
    x = torch.where(flags[:, 0].view(-1, 1, 1, 1), x.flip(-1), x)
    x = torch.where(flags[:, 1].view(-1, 1, 1, 1), x.flip(-2), x)
    return torch.where(flags[:, 2].view(-1, 1, 1, 1), torch.rot90(x, 1, (-2, -1)), x)


def cut_views(images: torch.Tensor, boxes: torch.Tensor, flags: torch.Tensor, rows: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[K, size, size, 3]``: view k cut from image ``rows[k]`` of the float batch."""
    rois = torch.cat([rows[:, None].to(images.dtype), boxes.to(images.dtype)], dim=1)
    out = roi_align(images, to_device(rois, images.device), output_size=size, sampling_ratio=-1, aligned=True)
    out = _apply_flags(out, to_device(flags, images.device))
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def decode_views(raw: dict, global_size: int, local_number: int, local_size: int, device: torch.device) -> dict:
    """The ingest's ``jpeg/boxes/flags`` rows -> the CPU path's ``global``/``local``/``sup`` uint8
    tensors on ``device`` (zeros where a row has no view, as the CPU path: undecodable rows, and the
    supervised view of unlabelled rows), with an ``ok`` mask that also drops what the device could
    not decode."""
    given = raw["ok"].numpy()
    images, decoded = decode_batch([b if k else None for b, k in zip(raw["jpeg"], given)], device)
    ok = given & decoded
    out = {k: v for k, v in raw.items() if k not in ("jpeg", "boxes", "flags")}
    out["ok"] = torch.from_numpy(ok)
    keep = np.flatnonzero(ok)
    groups = _by_size(images, keep)

    def group(first: int, count: int, size: int, rows: np.ndarray) -> torch.Tensor:
        full = torch.zeros((len(ok), count, size, size, 3), dtype=torch.uint8, device=device)
        for members, batch in groups:
            sel = members[np.isin(members, rows)]
            if not len(sel):
                continue
            views = cut_views(batch, raw["boxes"][sel, first:first + count].reshape(-1, 4),
                              raw["flags"][sel, first:first + count].reshape(-1, 3),
                              torch.from_numpy(np.searchsorted(members, sel)).repeat_interleave(count), size)
            full[to_device(torch.from_numpy(sel), device)] = views.view(len(sel), count, size, size, 3)
        return full

    out["global"] = group(0, 2, global_size, keep)
    if local_number:
        out["local"] = group(2, local_number, local_size, keep)
    if raw["boxes"].shape[1] > 2 + local_number:
        labelled = keep[raw["label"].numpy()[keep] >= 0]
        out["sup"] = group(2 + local_number, 1, global_size, labelled)[:, 0]
    return out


def device_decoder(cfg, device: torch.device):
    """``raw -> raw`` for the training loop: decode and cut the views of a ``data.decode: device`` batch."""
    d = cfg.data
    return lambda raw: decode_views(raw, d.image_size, d.local_crops_number, d.local_crops_size, device)
