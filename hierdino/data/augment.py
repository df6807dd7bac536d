"""The device half of augmentation (the training worker, batched torch ops with per-sample random
parameters): colour jitter, grayscale, Gaussian blur, solarize, normalisation. The CPU half
(decoding, crops, flips) is ``hierdino.data.crops``. Parameters follow DINOv2: global crop 1 always
blurred, global crop 2 blurred with p=0.1 and solarized with p=0.2, local crops (and the supervised
view) blurred with p=0.5; colour jitter (0.4, 0.4, 0.2, 0.1) with p=0.8 and grayscale with p=0.2
everywhere (``augment_views``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NORM_SCALE = tuple(1 / s for s in IMAGENET_STD)  # normalisation as x * scale + shift
_NORM_SHIFT = tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))


# -- device: photometric -------------------------------------------------------------------------

def _uniform(gen: torch.Generator, n: int, lo: float, hi: float, device) -> torch.Tensor:
    """Drawn on the generator's device (the training device: no host round trip per draw)."""
    return torch.rand(n, generator=gen, device=gen.device).to(device) * (hi - lo) + lo


def _bernoulli(gen: torch.Generator, n: int, p: float | torch.Tensor, device) -> torch.Tensor:
    """``n`` draws with probability ``p`` (a number, or one per row)."""
    u = torch.rand(n, generator=gen, device=gen.device)
    return (u < (p.to(u.device) if torch.is_tensor(p) else p)).to(device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma ``[B, 1, H, W]`` of ``x[B, 3, H, W]`` (three passes over one plane each)."""
    return x[:, 0].mul(0.299).add_(x[:, 1], alpha=0.587).add_(x[:, 2], alpha=0.114).unsqueeze(1)


# RGB -> YIQ and its inverse, as constants (no matrix inverse on the device: it would sync).
_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_FROM_YIQ = tuple(map(tuple, torch.linalg.inv(torch.tensor(_TO_YIQ, dtype=torch.float64)).tolist()))
_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(values: tuple, like: torch.Tensor) -> torch.Tensor:
    """``values`` as a tensor on ``like``'s device and dtype, made once per device and dtype: a tensor
    built from Python numbers on a GPU is a blocking host copy, which would stall every step."""
    key = (values, like.device, like.dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
    return _CONSTANTS[key]


def _hue_rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``angle`` radians per sample in YIQ space."""
    to_yiq, from_yiq = _constant(_TO_YIQ, x), _constant(_FROM_YIQ, x)
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    rot = torch.stack([one, zero, zero, zero, c, -s, zero, s, c], dim=1).view(-1, 3, 3)
    m = from_yiq @ rot @ to_yiq  # [B, 3, 3]
    return (m @ x.reshape(*x.shape[:2], -1)).view(x.shape)  # one batched product (einsum: 2.5x the time on a CPU)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float | None = None) -> torch.Tensor:
    """Per-sample Gaussian blur (separable, reflect borders); ``x[B, C, H, W]``, ``sigma[B]`` in pixels.

    The kernel radius is ``r = ceil(3 * max_sigma)``; give ``max_sigma`` (the sampling range's upper
    bound) to avoid reading ``sigma.max()`` back from the device. On a GPU each direction is one
    batched matrix product (``_blur_band``); on a CPU two depthwise convolutions (``_blur_taps``),
    which do ``2r + 1`` multiply-adds per pixel and direction where the matrix product does ``H`` or
    ``W`` (on one CPU core 3x faster at 96 and 224 px).
    """
    b, c, h, w = x.shape
    radius = max(1, int(math.ceil(3 * (float(sigma.max()) if max_sigma is None else max_sigma))))
    radius = min(radius, (min(h, w) - 1) // 2)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].to(x.dtype)) ** 2)
    k = k / k.sum(1, keepdim=True)  # [B, 2r + 1]
    return _blur_taps(x, k, radius) if x.device.type == "cpu" else _blur_band(x, k, radius)


def _blur_band(x: torch.Tensor, k: torch.Tensor, radius: int) -> torch.Tensor:
    """``y = M_H x M_W^T`` per sample, where ``M_n[b]`` (``n x n``) holds sample b's normalised kernel
    on its band with the reflected taps folded in at the borders: one launch per direction for the
    whole batch, whatever the kernel size (the GPU path)."""
    h, w = x.shape[-2:]
    m_w = _band_matrix(k, w, radius)
    m_h = m_w if h == w else _band_matrix(k, h, radius)
    return m_h[:, None] @ (x @ m_w.transpose(1, 2)[:, None])


def _blur_taps(x: torch.Tensor, k: torch.Tensor, radius: int) -> torch.Tensor:
    """Reflect-pad, then a ``1 x (2r+1)`` and a ``(2r+1) x 1`` depthwise convolution, one group per
    sample and channel (the CPU path)."""
    b, c, h, w = x.shape
    weight = k.repeat_interleave(c, 0)  # [B * C, 2r + 1]: sample b's kernel for each of its channels
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, weight.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, weight.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


def _band_matrix(k: torch.Tensor, n: int, radius: int) -> torch.Tensor:
    """``[B, n, n]``: row i of sample b is ``sum_j k[b, j] e_{reflect(i + j - radius)}`` (reflect: the
    border pixel is not repeated, as ``pad(mode="reflect")``; needs ``radius < n``)."""
    taps = torch.arange(n, device=k.device)[:, None] + torch.arange(-radius, radius + 1, device=k.device)
    taps = taps.abs()
    taps = torch.where(taps > n - 1, 2 * (n - 1) - taps, taps)  # [n, 2r + 1]
    m = k.new_zeros(k.shape[0], n, n)
    return m.scatter_add_(2, taps.expand(k.shape[0], n, -1), k[:, None, :].expand(-1, n, -1))


def _where_rows(mask: torch.Tensor, fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x[i], i)`` for the rows ``i`` where ``mask[B]`` holds, ``x`` elsewhere. On a CPU only those
    rows are computed (reading the mask is free there); on a GPU every row is computed and selected
    on the device, with no host read."""
    if x.device.type == "cpu":
        rows = mask.nonzero().squeeze(1)
        if len(rows) == 0:
            return x
        if len(rows) == len(x):
            return fn(x, slice(None))
        x[rows] = fn(x[rows], rows)
        return x
    return torch.where(mask.view(-1, 1, 1, 1), fn(x, slice(None)), x)


def augment_views(global_crops: torch.Tensor, local_crops: torch.Tensor | None, sup: torch.Tensor | None,
                  gen: torch.Generator, jitter: tuple = (0.4, 0.4, 0.2, 0.1), gray_p: float = 0.2,
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """DINOv2's photometric recipe for one batch's views (uint8, on the training device):
    ``global_crops[B, 2, S, S, 3]``, ``local_crops[B, N, s, s, 3]`` and the supervised views
    ``sup[L, S, S, 3]`` -> float ``[2B, 3, S, S]`` (crop-major: crop 1 of every image, then crop 2),
    ``[N*B, 3, s, s]`` (crop-major) and ``[L, 3, S, S]``.

    The views of size S go through one ``photometric`` call with per-row probabilities (global crop
    1 always blurred; crop 2 blurred with p=0.1 and solarized with p=0.2; the supervised view
    blurred with p=0.5 and its hue left alone), the local crops (blurred with p=0.5) through a second.
    ``jitter`` (brightness, contrast, saturation, hue bounds) and ``gray_p`` are DINOv2's by default
    (``data.color_jitter``, ``data.grayscale_p``).
    """
    b, dev = global_crops.shape[0], global_crops.device
    views = [global_crops[:, 0], global_crops[:, 1]] + ([sup] if sup is not None else [])
    counts = [len(v) for v in views]

    def per_row(ps):  # filled on the device: no host copy
        return torch.cat([torch.full((n,), p, device=dev) for n, p in zip(counts, ps)])

    # The supervised view's colour jitter is the paper's (0.4, 0.4, 0.2): no hue shift of the stain colours.
    bright, contrast, saturation, hue = jitter
    out = photometric(torch.cat(views), gen, blur_p=per_row([1.0, 0.1, 0.5]), solarize_p=per_row([0.0, 0.2, 0.0]),
                      gray_p=gray_p, jitter=(bright, contrast, saturation, per_row([hue, hue, 0.0])))
    local = None
    if local_crops is not None:
        local = photometric(local_crops.transpose(0, 1).reshape(-1, *local_crops.shape[2:]), gen, blur_p=0.5,
                            gray_p=gray_p, jitter=tuple(jitter))
    return out[:2 * b], local, (out[2 * b:] if sup is not None else None)


class _Draws(NamedTuple):
    """The random parameters of one ``photometric`` call, one entry per row (``None``: op never applied)."""

    jitter: torch.Tensor            # bool: colour jitter applied
    brightness: torch.Tensor        # factors, [B, 1, 1, 1]
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor               # radians, [B]
    gray: torch.Tensor              # bool
    blur: torch.Tensor | None       # bool
    sigma: torch.Tensor | None      # pixels
    max_sigma: float
    solarize: torch.Tensor | None   # bool

    def rows(self, sl: slice) -> "_Draws":
        return _Draws(*(v[sl] if torch.is_tensor(v) else v for v in self))


def _draw(gen: torch.Generator, n: int, size: int, dev, blur_p, solarize_p, jitter_p, gray_p, jitter) -> _Draws:
    """Every random parameter of a ``photometric`` call on ``n`` rows of ``size`` px, drawn from ``gen``
    before any pixel is touched (so the CPU path can go chunk by chunk with the same draws)."""
    bri, con, sat, hue = jitter
    j = _bernoulli(gen, n, jitter_p, dev)
    b = _uniform(gen, n, 1 - bri, 1 + bri, dev).view(-1, 1, 1, 1)
    cf = _uniform(gen, n, 1 - con, 1 + con, dev).view(-1, 1, 1, 1)
    s = _uniform(gen, n, 1 - sat, 1 + sat, dev).view(-1, 1, 1, 1)
    hshift = _uniform(gen, n, -1.0, 1.0, dev) * hue * 2 * math.pi  # hue: one bound, or a [B] tensor of them
    gray = _bernoulli(gen, n, gray_p, dev)
    scale = size / 224
    blur = sigma = sol = None
    if torch.is_tensor(blur_p) or blur_p > 0:
        blur = _bernoulli(gen, n, blur_p, dev)
        sigma = (_uniform(gen, n, 0.1, 2.0, dev) * scale).clamp_min(1e-3)  # DINOv2's 0.1-2 px at 224 px
    if torch.is_tensor(solarize_p) or solarize_p > 0:
        sol = _bernoulli(gen, n, solarize_p, dev)
    return _Draws(j, b, cf, s, hshift, gray, blur, sigma, 2.0 * scale, sol)


# Rows per step of the CPU path: as many as keep one float copy of the step near 3 MB, within the
# L2 and L3 caches, so that the ~20 passes of the recipe read the caches instead of memory (measured:
# 1 << 18 pixels per step, 5 images of 224 px, beat 1 << 14 to 1 << 17 and the whole batch at once).
CPU_STEP_PIXELS = 1 << 18


def photometric(images: torch.Tensor, gen: torch.Generator, blur_p: float | torch.Tensor,
                solarize_p: float | torch.Tensor = 0.0, jitter_p: float = 0.8, gray_p: float = 0.2,
                jitter: tuple = (0.4, 0.4, 0.2, 0.1), normalize: bool = True) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> augmented, normalised float ``[B, 3, H, W]`` on the same device.

    ``blur_p`` and ``solarize_p`` are one probability for every row or a ``[B]`` tensor of them; so is
    ``jitter``'s hue bound.
    Random parameters come from ``gen``, drawn on its device: a seed fixes them for a device type.
    No value is read back to the host unless the images are on the CPU. On a GPU the whole batch goes
    through each op at once; on a CPU a few rows at a time (``CPU_STEP_PIXELS``), with the same draws.
    """
    n, h, w = images.shape[:3]
    draws = _draw(gen, n, w, images.device, blur_p, solarize_p, jitter_p, gray_p, jitter)
    if images.device.type != "cpu":
        x = _apply(images, draws)
        return normalize_images(x) if normalize else x
    out = torch.empty(n, 3, h, w)
    step = max(1, CPU_STEP_PIXELS // (h * w))
    for i in range(0, n, step):
        x = _apply(images[i:i + step], draws.rows(slice(i, i + step)))
        if normalize:  # (x - mean) / std as x * (1 / std) - mean / std, written straight into the output
            torch.mul(x, _constant(_NORM_SCALE, x).view(1, 3, 1, 1), out=out[i:i + step])
            out[i:i + step].add_(_constant(_NORM_SHIFT, x).view(1, 3, 1, 1))
        else:
            out[i:i + step] = x
    return out


def _apply(images: torch.Tensor, d: _Draws) -> torch.Tensor:
    """``photometric`` on some rows with their draws, up to normalisation: colour jitter (brightness,
    contrast, saturation, hue, in that order), grayscale, blur, solarize; float in [0, 1]."""
    if images.device.type == "cpu":  # one pass to contiguous planes: the per-channel ops read them with unit stride
        x = torch.empty(images.shape[0], 3, *images.shape[1:3]).copy_(images.permute(0, 3, 1, 2)).div_(255.0)
    else:
        x = images.permute(0, 3, 1, 2).float().div_(255.0)

    def jitter_rows(t, i):  # each blend with grey, (y - grey) * f + grey, as one pass: y * f + grey * (1 - f)
        y = (t * d.brightness[i]).clamp_(0, 1)  # in place on fresh tensors: fewer passes over the images
        c, s = d.contrast[i], d.saturation[i]
        y = y.mul(c).add_(_gray(y).mean(dim=(2, 3), keepdim=True) * (1 - c)).clamp_(0, 1)
        y = y.mul(s).add_(_gray(y).mul_(1 - s)).clamp_(0, 1)
        return _hue_rotate(y, d.hue[i]).clamp_(0, 1)

    x = _where_rows(d.jitter, jitter_rows, x)
    x = _where_rows(d.gray, lambda t, i: _gray(t).repeat(1, 3, 1, 1), x)  # a copy: later ops write rows in place
    if d.blur is not None:
        x = _where_rows(d.blur, lambda t, i: gaussian_blur(t, d.sigma[i], max_sigma=d.max_sigma), x)
    if d.solarize is not None:
        x = _where_rows(d.solarize, lambda t, i: torch.minimum(t, 1 - t), x)  # 1 - t where t >= 0.5, else t
    return x


def normalize_images(x: torch.Tensor) -> torch.Tensor:
    """Float ``[B, 3, H, W]`` in [0, 1] -> ImageNet-normalised."""
    mean = _constant(IMAGENET_MEAN, x).view(1, 3, 1, 1)
    std = _constant(IMAGENET_STD, x).view(1, 3, 1, 1)
    return (x - mean) / std


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> normalised float ``[B, 3, H, W]`` without augmentation (evaluation)."""
    return normalize_images(images.permute(0, 3, 1, 2).float().div(255.0))
