"""The CPU half of augmentation, run in Ray Data ``map_batches`` (numpy + PIL, uint8 out): decoding,
random-resized crops with flips, and the supervised view (resize, flips, rot90).

Each image's views are planned before its pixels are decoded (``plan_views``: boxes in source
pixels and flips, drawn from the row's generator in a fixed order), so the decoder can be told the
resolution the views need: a JPEG whose every view is at least twice downscaled decodes directly at
1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling, PIL's ``draft``), which costs a fraction of a
full decode and of the resize after it (``draft_reduction``). The same plan drives the device
decoder (``hierdino.data.device_decode``), so every path draws the same crops from the same seed.

Kept free of torch: every Ray Data worker process imports this module, and importing torch there
costs seconds of start-up per process on a small machine. The device half is
``hierdino.data.augment``.
"""

from __future__ import annotations

import io
import math
import zlib
from typing import NamedTuple

import numpy as np
from PIL import Image


def row_rng(seed: int, image_id: str, epoch: int) -> np.random.Generator:
    """Per-image generator: the same (seed, image, epoch) always gives the same crops."""
    return np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(image_id.encode()), epoch])


class View(NamedTuple):
    """One output view of an image: the source box ``(left, top, right, bottom)`` in source pixels,
    resized to ``size x size`` (bicubic), then flipped left-right, top-bottom, and rotated 90 degrees
    counter-clockwise, in that order, where the flags say so."""

    box: tuple
    size: int
    hflip: bool = False
    vflip: bool = False
    rot90: bool = False


def crop_box(w: int, h: int, scale: tuple, rng: np.random.Generator, ratio: tuple = (3 / 4, 4 / 3)) -> tuple:
    """torchvision's RandomResizedCrop box: area share in ``scale``, log-uniform aspect ratio in
    ``ratio``, 10 tries, then the largest centred box whose aspect ratio lies in ``ratio``."""
    area = w * h
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return (x, y, x + cw, y + ch)
    cw, ch = w, h  # the fallback: the whole image, narrowed to the nearest allowed aspect ratio
    if w / h < ratio[0]:
        ch = int(round(w / ratio[0]))
    elif w / h > ratio[1]:
        cw = int(round(h * ratio[1]))
    x, y = (w - cw) // 2, (h - ch) // 2
    return (x, y, x + cw, y + ch)


def center_box(w: int, h: int, center: float = 1.0) -> tuple:
    """The centred ``(left, top, right, bottom)`` box keeping ``center`` of each side of a ``w x h``
    field (1.0: the whole field). Single-cell crops from analysers (CellaVision: PBC) centre the cell
    in a field of red cells, where a random crop of the whole field mostly cuts the cell away."""
    cw, ch = max(1, round(w * center)), max(1, round(h * center))
    x, y = (w - cw) // 2, (h - ch) // 2
    return (x, y, x + cw, y + ch)


def plan_views(w: int, h: int, rng: np.random.Generator, global_size: int, global_scale: tuple, local_number: int,
               local_size: int, local_scale: tuple, supervised: bool, center: float = 1.0) -> list[View]:
    """The views of one ``w x h`` image: 2 global crops, ``local_number`` local crops (each a
    random-resized crop, flipped left-right with p=0.5), then, when ``supervised``, the paper's mild
    view of a labelled image (the whole field resized, h/v flips and rot90 each with p=0.5). Every
    view is cut from the centred ``center`` share of each side (``center_box``), as if the image
    were that box."""
    x0, y0, x1, y1 = center_box(w, h, center)
    views = []
    for size, scale, n in ((global_size, global_scale, 2), (local_size, local_scale, local_number)):
        for _ in range(n):
            left, top, right, bottom = crop_box(x1 - x0, y1 - y0, scale, rng)
            views.append(View((left + x0, top + y0, right + x0, bottom + y0), size, hflip=bool(rng.random() < 0.5)))
    if supervised:
        flips = [bool(rng.random() < 0.5) for _ in range(3)]
        views.append(View((x0, y0, x1, y1), global_size, *flips))
    return views


def draft_reduction(views: list[View]) -> int:
    """The largest of 1, 2, 4, 8 by which the source can shrink while every view still downsamples
    (at least ``size`` source pixels per side of every box)."""
    r = min(min(v.box[2] - v.box[0], v.box[3] - v.box[1]) / v.size for v in views)
    return next((s for s in (8, 4, 2) if r >= s), 1)


def open_image(data: bytes) -> Image.Image:
    """The image's header only: size and format are known, no pixel is decoded yet."""
    return Image.open(io.BytesIO(data))


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(im: Image.Image) -> Image.Image:
    """``im`` with 8 bits per channel: 16-bit grey (PNG, TIFF; PIL modes ``I;16*`` and ``I``) keeps its
    top byte (``v >> 8``, as torchvision's ``to_dtype(..., scale=True)``), where PIL's own conversion
    would clip every value above 255 to white. Floating-point images have no agreed range: refused."""
    if im.mode in HIGH_DEPTH_MODES:
        return Image.fromarray((np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8), "L")
    if im.mode == "F":
        raise ValueError("a 32-bit floating-point image (PIL mode F): convert it to 8 or 16 bits per channel first")
    return im


def load_rgb(im: Image.Image, reduce: int = 1) -> tuple[Image.Image, float]:
    """Decode an opened image to RGB, a JPEG at 1/``reduce`` of its size (DCT scaling; other formats
    at full size). Returns the image and the factor source coordinates are divided by."""
    w, h = im.size
    drafted = im.draft("RGB", (max(1, w // reduce), max(1, h // reduce)))
    factor = 1.0 if drafted is None else w / drafted[1][2]
    return to_8bit(im).convert("RGB"), factor


def decode(data: bytes) -> Image.Image:
    """Full-size RGB decode (evaluation resizes whole fields or their centre, ``center_box``)."""
    return load_rgb(open_image(data))[0]



def render(im: Image.Image, view: View, factor: float = 1.0) -> np.ndarray:
    """``uint8 [size, size, 3]`` of ``view`` from ``im`` (decoded at 1/``factor`` of the source size)."""
    box = tuple(c / factor for c in view.box)
    out = np.asarray(im.resize((view.size, view.size), Image.BICUBIC, box=box))
    if view.hflip:
        out = out[:, ::-1]
    if view.vflip:
        out = out[::-1]
    if view.rot90:
        out = np.rot90(out)
    return out


def render_views(data: bytes, rng: np.random.Generator, draft: bool = True, **plan) -> list[np.ndarray]:
    """Plan the views of an encoded image (``plan_views`` keywords), decode it at the smallest
    resolution they allow (``draft=False``: always full size) and render them."""
    im = open_image(data)
    views = plan_views(*im.size, rng, **plan)
    rgb, factor = load_rgb(im, draft_reduction(views) if draft else 1)
    return [render(rgb, v, factor) for v in views]
