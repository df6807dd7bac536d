"""Procedural single-cell images whose morphology follows the class tree.

Every node of a hierarchy may carry a few morphology parameters (``NODE_SPECS``); the parameters
of a leaf are the defaults updated along its root path, lineage first. Siblings therefore share
everything their parents set and differ only in what the leaf itself sets, so cells close in the
tree look alike and cells of different lineages do not:

- lineage: cytoplasm colour, granule kind (none / fine pink / large orange / dark purple /
  azurophilic), cell size;
- maturity: nucleus size, chromatin texture, nucleoli;
- cell type: nucleus shape (round, kidney, band, 2-5 segmented lobes, bilobed, eccentric, folded,
  cleaved), vacuoles, Auer rods, hairy projections, perinuclear halo.

A ``Domain`` is the slide and scanner: stain hue/saturation, brightness, background with red
cells, blur, noise, scale and JPEG quality. Rendering is numpy on a small grid plus PIL for blur
and encoding; it is deterministic for a given ``numpy.random.Generator``.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from hierdino.hierarchy import Hierarchy

DEFAULT_SPEC: dict = {
    "cell_r": 0.62,          # cell radius, fraction of half the canvas
    "cell_aspect": 1.0,
    "cell_irregular": 0.03,  # low-frequency boundary wobble
    "hairy": 0.0,            # high-frequency projections (hairy cells)
    "cyto": (0.62, 0.70, 0.90),
    "granules": "none",      # none | fine_pink | large_orange | dark_purple | azurophilic | dust
    "granule_density": 0.0,
    "nucleus": "round",      # round | kidney | band | segmented | bilobed | eccentric | folded | cleaved | smudge | none
    "lobes": 3,
    "nuc_r": 0.6,            # nucleus radius, fraction of the cell radius
    "nuc_rgb": (0.36, 0.20, 0.50),
    "chromatin": 0.5,        # 0 fine/open ... 1 coarse/clumped
    "nucleoli": 0,
    "vacuoles": 0,
    "auer": False,
    "halo": False,           # pale perinuclear zone (plasma cells)
}

# What each node adds; a leaf's parameters are DEFAULT_SPEC updated along its root path.
NODE_SPECS: dict[str, dict] = {
    # lineages (wbc-h1)
    "lymphopoiesis": {"cell_r": 0.50, "cyto": (0.60, 0.72, 0.95), "nuc_r": 0.80, "chromatin": 0.8},
    "erythropoiesis": {"cell_r": 0.50, "cyto": (0.40, 0.36, 0.68), "nuc_r": 0.62, "chromatin": 0.9, "nuc_rgb": (0.24, 0.12, 0.34)},
    "monopoiesis": {"cell_r": 0.86, "cyto": (0.70, 0.70, 0.82), "granules": "dust", "granule_density": 0.15, "nuc_r": 0.62, "chromatin": 0.35},
    "granulopoiesis": {"cell_r": 0.74, "cyto": (0.92, 0.80, 0.82), "granules": "fine_pink", "granule_density": 0.25},
    "artefact": {"nucleus": "smudge", "cell_r": 0.80, "cyto": (0.90, 0.86, 0.92), "chromatin": 0.2},
    "unassigned_blast": {"cell_r": 0.66, "cyto": (0.52, 0.60, 0.90), "nuc_r": 0.82, "chromatin": 0.12, "nucleoli": 3},
    "thrombopoiesis": {"nucleus": "none", "cell_r": 0.26, "cyto": (0.72, 0.60, 0.86), "granules": "azurophilic",
                       "granule_density": 0.35, "cell_irregular": 0.18},
    # maturity groups
    "lymphoid_immature": {"nuc_r": 0.86, "chromatin": 0.2, "nucleoli": 2, "cyto": (0.50, 0.62, 0.95)},
    "lymphocyte_mature": {"nuc_r": 0.78, "chromatin": 0.85},
    "lymphocyte_mature_typical": {},
    "lymphocyte_atypical": {"cell_r": 0.66, "nuc_r": 0.68, "chromatin": 0.6},
    "erythroid_immature": {},
    "monocytic_immature": {"nuc_r": 0.74, "chromatin": 0.15, "nucleoli": 2, "cyto": (0.60, 0.64, 0.86)},
    "monocytic_mature": {"nucleus": "folded", "vacuoles": 3},
    "granulocytic_immature": {"nuc_r": 0.66, "chromatin": 0.3, "cyto": (0.72, 0.70, 0.90)},
    "granulocytic_mature": {"nuc_r": 0.46, "chromatin": 0.85, "nuc_rgb": (0.40, 0.18, 0.50)},
    "promyelocyte_group": {"granules": "azurophilic", "granule_density": 0.30, "nucleoli": 1, "chromatin": 0.35},
    "neutrophil": {},
    "eosinophil_group": {"granules": "large_orange", "granule_density": 0.55, "cyto": (0.96, 0.82, 0.70)},
    # cell types
    "lymphocyte_immature": {"nucleoli": 1, "chromatin": 0.3},
    "lymphoblast": {},
    "plasma_cell": {"nucleus": "eccentric", "halo": True, "cyto": (0.40, 0.48, 0.88), "cell_r": 0.60, "nuc_r": 0.55, "cell_aspect": 1.25},
    "lymphocyte_typical": {},
    "hairy_cell": {"hairy": 0.12, "nucleus": "kidney", "cyto": (0.66, 0.72, 0.90)},
    "lymphocyte_large_granular": {"granules": "azurophilic", "granule_density": 0.08, "cell_r": 0.70},
    "lymphocyte_reactive": {"cyto": (0.45, 0.58, 0.95), "cell_r": 0.74, "cell_irregular": 0.10},
    "lymphocyte_neoplastic": {"nucleus": "cleaved", "chromatin": 0.7},
    "proerythroblast": {"nuc_r": 0.80, "chromatin": 0.35, "nucleoli": 2, "cell_r": 0.62},
    "erythroblast": {"nuc_r": 0.45, "chromatin": 1.0, "cyto": (0.62, 0.48, 0.66)},
    "monoblast": {"nucleus": "round"},
    "monocyte": {},
    "myeloblast": {"nuc_r": 0.80, "chromatin": 0.12, "nucleoli": 3, "granules": "none"},
    "promyelocyte": {},
    "promyelocyte_bilobed": {"nucleus": "bilobed"},
    "fagott_cell": {"auer": True},
    "myelocyte": {"nuc_r": 0.56, "chromatin": 0.55, "nucleus": "round"},
    "metamyelocyte": {"nuc_r": 0.52, "chromatin": 0.65, "nucleus": "kidney"},
    "basophil": {"granules": "dark_purple", "granule_density": 0.55, "nucleus": "bilobed", "cyto": (0.80, 0.72, 0.88)},
    "neutrophil_band": {"nucleus": "band"},
    "neutrophil_segmented": {"nucleus": "segmented", "lobes": (2, 5)},
    "eosinophil": {"nucleus": "bilobed"},
    "eosinophil_abnormal": {"nucleus": "segmented", "lobes": (3, 4), "granules": "dark_purple", "granule_density": 0.35},
    "smudge_cell": {},
    "blast": {},
    "platelet": {},
    # synth-ood: cervical-like cytology (squamous / glandular / inflammatory)
    "squamous": {"cell_r": 0.95, "cell_irregular": 0.16, "cyto": (0.72, 0.86, 0.84), "nuc_r": 0.18, "chromatin": 0.5,
                 "nuc_rgb": (0.30, 0.22, 0.45)},
    "squamous_normal": {},
    "squamous_lesion": {"nuc_r": 0.38, "chromatin": 0.9, "nucleus": "cleaved", "nuc_rgb": (0.22, 0.12, 0.36)},
    "superficial": {"cyto": (0.94, 0.76, 0.78), "nuc_r": 0.10, "chromatin": 1.0},
    "intermediate": {},
    "parabasal": {"cell_r": 0.62, "cell_irregular": 0.05, "nuc_r": 0.32},
    "lsil": {"nuc_r": 0.30, "halo": True},
    "hsil": {"cell_r": 0.62, "nuc_r": 0.62},
    "scc": {"cell_aspect": 1.8, "cyto": (0.94, 0.70, 0.62), "nuc_r": 0.5},
    "glandular": {"cell_r": 0.62, "cell_aspect": 1.7, "cyto": (0.74, 0.74, 0.88), "nucleus": "eccentric", "nuc_r": 0.5,
                  "chromatin": 0.4, "vacuoles": 2},
    "glandular_normal": {},
    "glandular_lesion": {"nuc_r": 0.7, "nucleoli": 2, "chromatin": 0.8, "nuc_rgb": (0.24, 0.14, 0.40)},
    "endocervical": {},
    "endometrial": {"cell_r": 0.45, "cell_aspect": 1.2, "nuc_r": 0.7},
    "agc": {},
    "adenocarcinoma": {"nucleus": "cleaved", "vacuoles": 5},
    "inflammatory_cells": {},
    "inflammatory": {"cell_r": 0.34, "cyto": (0.88, 0.80, 0.86)},
    "neutrophil_ood": {"nucleus": "segmented", "lobes": (3, 4), "nuc_r": 0.5, "granules": "fine_pink", "granule_density": 0.2},
    "lymphocyte_ood": {"nuc_r": 0.8, "chromatin": 0.9, "cyto": (0.6, 0.72, 0.95)},
    "histiocyte": {"cell_r": 0.55, "nucleus": "kidney", "vacuoles": 4, "cyto": (0.76, 0.74, 0.84)},
}

GRANULE_RGB = {
    "fine_pink": ((0.84, 0.55, 0.66), 0.6),
    "large_orange": ((0.90, 0.45, 0.20), 1.6),
    "dark_purple": ((0.25, 0.10, 0.35), 1.4),
    "azurophilic": ((0.55, 0.15, 0.45), 1.0),
    "dust": ((0.74, 0.62, 0.78), 0.5),
}


@dataclass(frozen=True)
class Domain:
    """Slide preparation and scanner: what changes between datasets, not between classes."""

    name: str
    hue_shift: float = 0.0        # degrees, rotation about the grey axis
    saturation: float = 1.0
    brightness: float = 1.0
    background: tuple = (0.93, 0.88, 0.86)
    red_cells: float = 3.0        # mean number of red cells in the background
    red_rgb: tuple = (0.90, 0.60, 0.62)
    blur: float = 0.4             # Gaussian sigma at 64 px (scaled with image size)
    noise: float = 0.015
    scale: float = 1.0            # cell size multiplier
    jpeg_quality: int = 90


DOMAINS: dict[str, Domain] = {
    "A": Domain("A"),
    "B": Domain("B", hue_shift=-8, saturation=1.15, brightness=0.95, background=(0.95, 0.86, 0.84), blur=0.7, scale=0.92,
                jpeg_quality=85),
    "C": Domain("C", hue_shift=10, saturation=0.9, brightness=1.05, background=(0.90, 0.90, 0.93), red_cells=5, noise=0.02,
                scale=1.06),
    "ext-1": Domain("ext-1", hue_shift=22, saturation=0.8, brightness=1.08, background=(0.96, 0.93, 0.90), red_cells=1.5,
                    blur=0.9, noise=0.025, scale=0.88, jpeg_quality=75),
    "ext-2": Domain("ext-2", hue_shift=-20, saturation=1.25, brightness=0.9, background=(0.88, 0.84, 0.90), red_cells=6,
                    blur=0.3, noise=0.03, scale=1.12, jpeg_quality=80),
    "ood": Domain("ood", hue_shift=35, saturation=0.85, brightness=1.02, background=(0.92, 0.92, 0.88), red_cells=0.5,
                  blur=0.6, noise=0.02, scale=1.0, jpeg_quality=85),
}


def leaf_spec(hierarchy: Hierarchy, leaf: str) -> dict:
    """Morphology parameters of ``leaf``: defaults updated by every node on its root path."""
    spec = dict(DEFAULT_SPEC)
    for node in hierarchy.path(leaf):
        spec.update(NODE_SPECS.get(node, {}))
    return spec


@functools.lru_cache(maxsize=8)
def _texture_bank(size: int, count: int = 16) -> np.ndarray:
    """Smooth noise fields ``[count, 2*size, 2*size]`` in [-1, 1]; random crops make chromatin and cytoplasm texture."""
    rng = np.random.default_rng(1234)
    out = np.empty((count, 2 * size, 2 * size), np.float32)
    for i in range(count):
        img = Image.fromarray((rng.random((2 * size, 2 * size)) * 255).astype(np.uint8))
        sigma = max(0.6, size / 64 * (0.8 + (i % 4) * 0.5))
        a = np.asarray(img.filter(ImageFilter.GaussianBlur(sigma)), np.float32)
        a = (a - a.mean()) / (a.std() + 1e-6)
        out[i] = np.clip(a / 2.5, -1, 1)
    return out


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.meshgrid(c, c, indexing="xy")


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    bank = _texture_bank(size)
    i = rng.integers(len(bank))
    y, x = rng.integers(0, size, 2)
    return bank[i, y:y + size, x:x + size]


def _hue_matrix(degrees: float, saturation: float) -> np.ndarray:
    """RGB matrix: rotation by ``degrees`` about the grey axis, then saturation scaling."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    k = np.full((3, 3), 1 / 3, np.float32)
    cross = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], np.float32) / math.sqrt(3)
    rot = c * np.eye(3, dtype=np.float32) + (1 - c) * k + s * cross
    sat = k + saturation * (np.eye(3, dtype=np.float32) - k)
    return (sat @ rot).astype(np.float32)


def _paint(img: np.ndarray, mask: np.ndarray, rgb) -> None:
    """Alpha-blend a colour into ``img`` with a soft mask in [0, 1]."""
    m = mask[..., None]
    img *= 1 - m
    img += m * np.asarray(rgb, np.float32)


def _soft(d: np.ndarray, edge: float) -> np.ndarray:
    """Signed distance (negative inside) -> soft mask with an antialiased edge."""
    return np.clip(0.5 - d / edge, 0.0, 1.0)


def _nucleus_distance(shape: str, x: np.ndarray, y: np.ndarray, r: float, spec: dict, rng) -> np.ndarray:
    """Approximate signed distance of the nucleus (negative inside), in nucleus-centred rotated coordinates."""
    if shape in ("round", "eccentric"):
        return np.sqrt((x / 1.08) ** 2 + (y / 0.94) ** 2) - r
    if shape == "cleaved":
        ang = np.arctan2(y, x)
        wob = 1 + 0.16 * np.sin(3 * ang + rng.uniform(0, 6.3)) + 0.08 * np.sin(5 * ang + rng.uniform(0, 6.3))
        return np.sqrt(x ** 2 + y ** 2) - r * wob
    if shape in ("kidney", "folded"):
        body = np.sqrt((x / 1.15) ** 2 + (y / 0.9) ** 2) - r
        notch = np.sqrt((x - 0.0) ** 2 + (y - r * 1.05) ** 2) - r * (0.55 if shape == "kidney" else 0.4)
        d = np.maximum(body, -notch)
        if shape == "folded":
            d = d + 0.06 * r * np.sin(7 * np.arctan2(y, x))
        return d
    if shape == "band":
        ring = np.abs(np.sqrt(x ** 2 + (y - r * 0.5) ** 2) - r * 0.95) - r * 0.28
        return np.maximum(ring, y - r * 0.55)  # the ring opened at the top: a C/U shape
    if shape in ("segmented", "bilobed"):
        lobes = spec["lobes"]
        if shape == "bilobed":
            k = 2
        elif isinstance(lobes, (tuple, list)):
            k = int(rng.integers(lobes[0], lobes[1] + 1))
        else:
            k = int(lobes)
        rl = r * (0.62 if k == 2 else 0.5)
        span = math.radians(150 if k > 2 else 120)
        d = np.full(x.shape, 10.0, np.float32)
        ring_r = r * 0.9
        for i in range(k):
            a = -span / 2 + span * i / max(k - 1, 1) - math.pi / 2
            cx, cy = ring_r * math.cos(a), ring_r * math.sin(a) + ring_r * 0.6
            d = np.minimum(d, np.sqrt((x - cx) ** 2 + (y - cy) ** 2) - rl)
        thread = np.abs(np.sqrt(x ** 2 + (y - ring_r * 0.6) ** 2) - ring_r) - r * 0.06
        return np.minimum(d, np.maximum(thread, y - ring_r * 0.6 + ring_r * 0.2))
    raise ValueError(f"unknown nucleus shape {shape!r}")


def render_cell(spec: dict, domain: Domain, size: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB cell image ``uint8 [size, size, 3]``: background red cells, the cell body, nucleus,
    granules and Auer rods, then the domain's stain, brightness, blur and noise (in that order: the
    random draws follow it, so a seed fixes the image)."""
    X, Y = _grid(size)
    edge = 1.5 * 2.0 / size  # 1.5 pixels in grid units
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.asarray(domain.background, np.float32)
    _paint_red_cells(img, X, Y, domain, edge, rng)
    body = _cell_body(spec, domain, X, Y, edge, rng)
    _paint_cytoplasm(img, spec, body, edge, rng)
    if spec["nucleus"] not in ("none", "smudge"):
        _paint_nucleus(img, spec, body, size, edge, rng)
    if spec["granules"] != "none" and spec["granule_density"] > 0:
        _paint_granules(img, spec, body["cell"], size, rng)
    if spec["auer"]:
        _paint_auer_rods(img, body, size, edge, rng)
    return _apply_domain(img, domain, size, rng)


def _paint_red_cells(img, X, Y, domain: Domain, edge: float, rng) -> None:
    """Red cells in the background: pale-centred discs."""
    for _ in range(rng.poisson(domain.red_cells)):
        cx, cy = rng.uniform(-1.1, 1.1, 2)
        rr = rng.uniform(0.28, 0.38) * domain.scale
        d = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2)
        _paint(img, _soft(d - rr, edge) * 0.85, domain.red_rgb)
        _paint(img, _soft(d - rr * 0.45, rr * 0.6) * 0.35, domain.background)


def _jitter(value: float, sd: float, rng) -> float:
    """Per-image size variation."""
    return value * (1 + rng.normal(0, sd))


def _cell_body(spec: dict, domain: Domain, X, Y, edge: float, rng) -> dict:
    """The cell's frame (rotated, stretched, wobbly outline), its mask, texture and cytoplasm colour."""
    cell_r = _jitter(spec["cell_r"], 0.07, rng) * domain.scale
    ox, oy = rng.normal(0, 0.05, 2)
    theta = rng.uniform(0, 2 * math.pi)
    ct, st = math.cos(theta), math.sin(theta)
    xr, yr = (X - ox) * ct + (Y - oy) * st, -(X - ox) * st + (Y - oy) * ct
    asp = spec["cell_aspect"]
    xa, ya = xr / math.sqrt(asp), yr * math.sqrt(asp)
    ang = np.arctan2(ya, xa)
    wob = 1 + spec["cell_irregular"] * (np.sin(2 * ang + rng.uniform(0, 6.3)) + 0.6 * np.sin(3 * ang + rng.uniform(0, 6.3)))
    if spec["hairy"]:
        wob = wob + spec["hairy"] * np.maximum(np.sin(int(rng.integers(14, 22)) * ang + rng.uniform(0, 6.3)), 0) ** 3
    cell = _soft(np.sqrt(xa ** 2 + ya ** 2) - cell_r * wob, edge)
    tex = _texture(X.shape[0], rng)
    cyto = np.clip(np.asarray(spec["cyto"], np.float32) + rng.normal(0, 0.02, 3), 0, 1)
    return {"cell_r": cell_r, "xr": xr, "yr": yr, "ya": ya, "cell": cell, "tex": tex, "cyto": cyto}


def _paint_cytoplasm(img, spec: dict, body: dict, edge: float, rng) -> None:
    """Cytoplasm with a halo and vacuoles, or a smudge (smeared chromatin, no intact cytoplasm)."""
    xr, yr, cell, cell_r = body["xr"], body["yr"], body["cell"], body["cell_r"]
    if spec["nucleus"] == "smudge":
        streak = np.clip(0.5 + 0.5 * body["tex"], 0, 1) * _soft(np.sqrt((xr / 1.6) ** 2 + body["ya"] ** 2) - cell_r, 6 * edge)
        _paint(img, streak * 0.8, spec["nuc_rgb"])
        return
    _paint(img, cell * (0.92 + 0.08 * body["tex"]), body["cyto"])
    if spec["halo"]:
        _paint(img, _soft(np.sqrt(xr ** 2 + yr ** 2) - cell_r * 0.45, 4 * edge) * 0.5 * cell, (0.92, 0.92, 0.96))
    for _ in range(spec["vacuoles"] + (rng.poisson(1) if spec["vacuoles"] else 0)):
        a, rad = rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 0.85) * cell_r
        vr = rng.uniform(0.05, 0.09) * cell_r / 0.6
        d = np.sqrt((xr - rad * math.cos(a)) ** 2 + (yr - rad * math.sin(a)) ** 2) - vr
        _paint(img, _soft(d, edge) * cell * 0.8, (0.96, 0.96, 0.98))


def _paint_nucleus(img, spec: dict, body: dict, size: int, edge: float, rng) -> None:
    """The nucleus (shape from ``spec["nucleus"]``), its chromatin clumps and nucleoli."""
    cell_r = body["cell_r"]
    nuc_r = _jitter(spec["nuc_r"], 0.06, rng) * cell_r
    shift = (cell_r - nuc_r) * 0.8 if spec["nucleus"] == "eccentric" else rng.normal(0, 0.03)
    nx, ny = body["xr"] - shift, body["yr"]
    nuc = _soft(_nucleus_distance(spec["nucleus"], nx, ny, nuc_r, spec, rng), edge) * body["cell"]
    chrom = spec["chromatin"]
    clump = np.clip((_texture(size, rng) - (0.4 - 0.5 * chrom)) * (2 + 6 * chrom), 0, 1)
    nrgb = np.asarray(spec["nuc_rgb"], np.float32) + rng.normal(0, 0.02, 3)
    shade = (1.0 + 0.35 * (1 - chrom)) - 0.45 * chrom * clump
    _paint(img, nuc * 0.95, np.clip(nrgb, 0, 1))
    img *= (1 - nuc[..., None] * (1 - np.clip(shade, 0.4, 1.5))[..., None] * 0.6)
    for _ in range(spec["nucleoli"]):
        a, rad = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.45) * nuc_r
        d = np.sqrt((nx - rad * math.cos(a)) ** 2 + (ny - rad * math.sin(a)) ** 2) - max(0.12 * nuc_r, 1.2 * 2.0 / size)
        _paint(img, _soft(d, edge) * nuc * 0.8, (0.62, 0.62, 0.88))


def _paint_granules(img, spec: dict, cell, size: int, rng) -> None:
    """Cytoplasmic granules: dots of the granule type's colour and size inside the cell."""
    rgb, g_size = GRANULE_RGB[spec["granules"]]
    inside = np.flatnonzero(cell.ravel() > 0.5)
    n = int(spec["granule_density"] * inside.size * (0.35 if g_size > 1 else 0.5) / max(g_size, 0.5) ** 2)
    if not (n and inside.size):
        return
    pick = rng.choice(inside, size=min(n, inside.size), replace=False)
    gy, gx = np.divmod(pick, size)
    flat = img.reshape(-1, 3)
    rad = max(0, int(round(g_size * size / 64 / 2)))
    for dy in range(-rad, rad + 1):
        for dx in range(-rad, rad + 1):
            yy, xx = np.clip(gy + dy, 0, size - 1), np.clip(gx + dx, 0, size - 1)
            flat[yy * size + xx] = 0.35 * flat[yy * size + xx] + 0.65 * np.asarray(rgb, np.float32)


def _paint_auer_rods(img, body: dict, size: int, edge: float, rng) -> None:
    """Two to four thin rods near the cell's rim."""
    xr, yr, cell_r = body["xr"], body["yr"], body["cell_r"]
    for _ in range(int(rng.integers(2, 5))):
        a, rad = rng.uniform(0, 2 * math.pi), rng.uniform(0.55, 0.8) * cell_r
        cx, cy = rad * math.cos(a), rad * math.sin(a)
        b = rng.uniform(0, math.pi)
        along = (xr - cx) * math.cos(b) + (yr - cy) * math.sin(b)
        across = -(xr - cx) * math.sin(b) + (yr - cy) * math.cos(b)
        d = np.maximum(np.abs(along) - 0.22 * cell_r, np.abs(across) - 0.8 * 2.0 / size)
        _paint(img, _soft(d, edge) * 0.9, (0.58, 0.12, 0.30))


def _apply_domain(img, domain: Domain, size: int, rng) -> np.ndarray:
    """The domain's stain (hue, saturation), brightness, blur and sensor noise; ``uint8``."""
    img = img.reshape(-1, 3) @ _hue_matrix(domain.hue_shift, domain.saturation).T
    img = img.reshape(size, size, 3) * domain.brightness
    out = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))
    sigma = domain.blur * size / 64
    if sigma > 0.05:
        out = out.filter(ImageFilter.GaussianBlur(sigma))
    arr = np.asarray(out, np.float32)
    arr += rng.normal(0, domain.noise * 255, arr.shape).astype(np.float32)
    return np.clip(arr, 0, 255).astype(np.uint8)


def encode(image: np.ndarray, fmt: str = "JPEG", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def render_encoded(hierarchy: Hierarchy, leaf: str, domain: Domain, size: int, rng: np.random.Generator) -> bytes:
    """A JPEG of a ``leaf`` cell at the domain's quality."""
    return encode(render_cell(leaf_spec(hierarchy, leaf), domain, size, rng), "JPEG", domain.jpeg_quality)
