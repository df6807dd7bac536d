"""iBOT block masks for the global crops.

A fraction ``sample_prob`` of the crops in a batch is masked; their mask ratios are spread evenly
over ``ratio`` (crop i of n draws from the i-th of n equal sub-intervals), and each mask is grown
from random rectangles (at least 4 patches, aspect ratio log-uniform in [0.3, 3.3]) until it
reaches its target count; never more than half the patches when ``ratio[1] <= 0.5``.
"""

from __future__ import annotations

import math

import torch


def block_mask(grid: int, num_masked: int, gen: torch.Generator, min_patches: int = 4,
               aspect: tuple = (0.3, 1 / 0.3)) -> torch.Tensor:
    """A bool ``[grid*grid]`` mask with exactly ``num_masked`` True entries, built from rectangles."""
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    log_a = (math.log(aspect[0]), math.log(aspect[1]))
    tries = 0
    while int(mask.sum()) < num_masked and tries < 200:
        tries += 1
        left = num_masked - int(mask.sum())
        target = float(torch.empty(1).uniform_(min_patches, max(min_patches, left), generator=gen))
        ar = math.exp(float(torch.empty(1).uniform_(*log_a, generator=gen)))
        h = max(1, min(grid, int(round(math.sqrt(target * ar)))))
        w = max(1, min(grid, int(round(math.sqrt(target / ar)))))
        top = int(torch.randint(0, grid - h + 1, (1,), generator=gen))
        lft = int(torch.randint(0, grid - w + 1, (1,), generator=gen))
        region = mask[top:top + h, lft:lft + w]
        new = (~region).nonzero()
        if len(new) > left:  # trim so the count is exact
            keep = new[torch.randperm(len(new), generator=gen)[:left]]
            region[keep[:, 0], keep[:, 1]] = True
        else:
            region[:] = True
    flat = mask.flatten()
    short = num_masked - int(flat.sum())
    if short > 0:  # rare: fill the rest at random
        free = (~flat).nonzero().flatten()
        flat[free[torch.randperm(len(free), generator=gen)[:short]]] = True
    return flat


def ibot_masks(batch: int, grid: int, sample_prob: float, ratio: tuple, gen: torch.Generator) -> torch.Tensor:
    """Bool ``[batch, grid*grid]``: block masks for ``round(batch * sample_prob)`` crops, the rest unmasked."""
    n_patches = grid * grid
    n_masked_crops = int(round(batch * sample_prob))
    masks = torch.zeros(batch, n_patches, dtype=torch.bool)
    if n_masked_crops == 0:
        return masks
    edges = torch.linspace(ratio[0], ratio[1], n_masked_crops + 1)
    for i in range(n_masked_crops):
        r = float(torch.empty(1).uniform_(float(edges[i]), float(edges[i + 1]), generator=gen))
        masks[i] = block_mask(grid, int(round(r * n_patches)), gen)
    return masks[torch.randperm(batch, generator=gen)]
