"""This process's random generators (torch, NumPy, Python, and the current GPU's: drop-path draws),
taken into a checkpoint's train state and set back on resume, so that a resumed run draws on."""

from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    """The generators' states now; the GPU's only where CUDA is in use."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict | None, step: int) -> None:
    """Set the generators to ``state`` (from ``capture``). ``None``: a rank the checkpoint had no state
    for (a larger world) seeds torch from its own initial seed and ``step`` instead of drawing another
    rank's numbers. A CPU checkpoint resumed on a GPU keeps the GPU's seeded state."""
    if state is None:
        torch.manual_seed(torch.initial_seed() + step)
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
