"""The CPU half of augmentation, run in Ray Data ``map_batches`` (numpy + PIL, uint8 out): decoding,
random-resized crops with flips, and the supervised view (resize, flips, rot90).

Kept free of torch: every Ray Data worker process imports this module, and importing torch there
costs seconds of start-up per process on a small machine. The device half is
``hierdino.data.augment``.
"""

from __future__ import annotations

import io
import math
import zlib

import numpy as np
from PIL import Image


def row_rng(seed: int, image_id: str, epoch: int) -> np.random.Generator:
    """Per-image generator: the same (seed, image, epoch) always gives the same crops."""
    return np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(image_id.encode()), epoch])


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (im.size[0], im.size[1]))
    return im.convert("RGB")


def random_resized_crop(im: Image.Image, size: int, scale: tuple, rng: np.random.Generator,
                        ratio: tuple = (3 / 4, 4 / 3)) -> np.ndarray:
    """torchvision's RandomResizedCrop sampling, then a flip with p=0.5; ``uint8 [size, size, 3]``."""
    w, h = im.size
    area = w * h
    box = (0, 0, w, h)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        cw, ch = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (x, y, x + cw, y + ch)
            break
    out = np.asarray(im.resize((size, size), Image.BICUBIC, box=box))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return out


def supervised_view(im: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """The paper's mild view of a labelled image: resize (no crop), h/v flips p=0.5, rot90 p=0.5."""
    out = np.asarray(im.resize((size, size), Image.BICUBIC))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1]
    if rng.random() < 0.5:
        out = np.rot90(out)
    return np.ascontiguousarray(out)
