"""Encoded images -> uint8 arrays for evaluation and embedding (PIL: the centred share of each side,
bicubic resize). Without torch, so that the CPU decode tasks of a GPU evaluation or embedding do not
load it (``tests/test_eval.py`` checks the import)."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image

from hierdino.data.crops import center_box, decode
from hierdino.eval import EvalDataError


def decode_images(blobs, size: int, ids=None, center: float = 1.0) -> np.ndarray:
    """Encoded images -> uint8 ``[N, size, size, 3]``: the centred ``center`` share of each side
    (``crops.center_box``), bicubic resize. An image that does not decode raises (``EvalDataError``
    naming it by ``ids`` when given): scored as a blank image under its label, it would bias the
    evaluation without a word."""
    out, errors = decode_rows(blobs, size, center)
    raise_undecodable(errors, ids)
    return out


def decode_rows(blobs, size: int, center: float = 1.0) -> tuple[np.ndarray, list[str]]:
    """The images (blank where one does not decode) and, per image, why it does not ("" when it does)."""
    out = np.zeros((len(blobs), size, size, 3), np.uint8)
    errors = [""] * len(blobs)
    for i, b in enumerate(blobs):
        try:
            im = decode(b)
            out[i] = np.asarray(im.resize((size, size), Image.BICUBIC, box=center_box(*im.size, center)))
        except Exception as e:  # PIL raises many types for broken files
            errors[i] = f"{type(e).__name__}: " + re.sub(r"<_io.BytesIO object at 0x[0-9a-f]+>", "the file", str(e))
    return out, errors


def raise_undecodable(errors, ids=None, where: str = "") -> None:
    bad = [f"{ids[i] if ids is not None else f'image {i}'} ({e})" for i, e in enumerate(errors) if e]
    if bad:
        raise EvalDataError(f"{len(bad)} of {len(errors)} evaluation image(s){where} could not be decoded; remove or "
                            "re-encode them (jobs/make_shards.py checks every image): " + "; ".join(bad[:5]))


def decode_batch(batch: dict, size: int, center: float = 1.0) -> dict:
    """A batch of rows with ``image`` bytes -> the same rows with ``pixels`` (uint8 ``[N, size, size,
    3]``) and ``decode_error`` instead: the CPU half of ``features._Extractor``, for a stage of its own when
    the model runs on GPUs."""
    images, errors = decode_rows(batch["image"], size, center)
    rest = {k: v for k, v in batch.items() if k != "image"}
    return rest | {"pixels": images, "decode_error": np.array(errors, dtype=object)}
