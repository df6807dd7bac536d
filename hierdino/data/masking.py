"""iBOT block masks for the global crops.

A fraction ``sample_prob`` of the crops in a batch is masked; their mask ratios are spread evenly
over ``ratio`` (crop i of n draws from the i-th of n equal sub-intervals), and each mask is grown
from random rectangles (at least 4 patches, aspect ratio log-uniform in [0.3, 3.3]) until it
reaches its target count; never more than half the patches when ``ratio[1] <= 0.5``.

The step takes the masked patches as a fixed-size buffer (``padded_mask_index``): their flat
indices padded to ``max_masked_patches``, an upper bound set by the config alone, with a validity
weight (1 real, 0 padding), as DINOv2 pads them; every shape of the step is then fixed by the config.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def block_mask(grid: int, num_masked: int, rng: np.random.Generator, min_patches: int = 4,
               aspect: tuple = (0.3, 1 / 0.3)) -> np.ndarray:
    """A bool ``[grid*grid]`` mask with exactly ``num_masked`` True entries, built from rectangles.

    NumPy on the host: a batch of masks is hundreds of tiny draws and slices, which cost
    microseconds each here and tens of microseconds each as torch ops.
    """
    mask = np.zeros((grid, grid), dtype=bool)
    log_a = (math.log(aspect[0]), math.log(aspect[1]))
    count, tries = 0, 0
    while count < num_masked and tries < 200:
        tries += 1
        left = num_masked - count
        target = rng.uniform(min_patches, max(min_patches, left))
        ar = math.exp(rng.uniform(*log_a))
        h = max(1, min(grid, int(round(math.sqrt(target * ar)))))
        w = max(1, min(grid, int(round(math.sqrt(target / ar)))))
        top = int(rng.integers(0, grid - h + 1))
        lft = int(rng.integers(0, grid - w + 1))
        region = mask[top:top + h, lft:lft + w]
        fresh = region.size - int(np.count_nonzero(region))  # patches this rectangle adds
        if fresh > left:  # trim so the count is exact
            new = np.argwhere(~region)
            keep = new[rng.permutation(fresh)[:left]]
            region[keep[:, 0], keep[:, 1]] = True
        else:
            region[:] = True
        count += min(fresh, left)
    flat = mask.reshape(-1)
    short = num_masked - count
    if short > 0:  # rare: fill the rest at random
        free = np.flatnonzero(~flat)
        flat[free[rng.permutation(len(free))[:short]]] = True
    return flat


def ibot_masks(batch: int, grid: int, sample_prob: float, ratio: tuple, gen: torch.Generator) -> torch.Tensor:
    """Bool ``[batch, grid*grid]``: block masks for ``round(batch * sample_prob)`` crops, the rest unmasked.

    One draw from ``gen`` seeds the NumPy generator that draws the masks, so ``gen``'s seed fixes them.
    """
    n_patches = grid * grid
    n_masked_crops = int(round(batch * sample_prob))
    masks = np.zeros((batch, n_patches), dtype=bool)
    if n_masked_crops == 0:
        return torch.from_numpy(masks)
    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
    edges = np.linspace(ratio[0], ratio[1], n_masked_crops + 1)
    for i in range(n_masked_crops):
        r = rng.uniform(edges[i], edges[i + 1])
        masks[i] = block_mask(grid, int(round(r * n_patches)), rng)
    return torch.from_numpy(masks[rng.permutation(batch)])


def max_masked_patches(batch: int, grid: int, sample_prob: float, ratio: tuple) -> int:
    """Upper bound on the masked patches of any ``ibot_masks(batch, grid, sample_prob, ratio, ...)``:
    ``round(batch * sample_prob)`` masked crops of ``round(r * grid**2) <= round(ratio[1] * grid**2)`` patches."""
    n_patches = grid * grid
    return int(round(batch * sample_prob)) * min(n_patches, int(round(ratio[1] * n_patches)))


def padded_mask_index(masks: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index[size], weight[size])``: the flat indices of ``masks``' True entries (``nonzero`` order)
    followed by padding (index 0), and a float weight 1 for each real entry, 0 for the padding."""
    index = masks.flatten().nonzero().squeeze(1)
    if len(index) > size:
        raise ValueError(f"{len(index)} masked patches exceed the buffer of {size} (max_masked_patches)")
    padded, weight = torch.zeros(size, dtype=torch.long), torch.zeros(size)
    padded[:len(index)], weight[:len(index)] = index, 1.0
    return padded, weight
