"""One seed for every random number generator the app touches (``--seed``)."""

from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int) -> np.random.Generator:
    """Seed Python, NumPy and PyTorch global state; return a NumPy generator from ``seed``.

    Code should still prefer explicit generators (``torch.Generator().manual_seed(seed)``);
    the global seeding covers libraries that draw from global state.
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:  # torch is a hard dependency; this guards stripped-down tool images
        pass
    else:
        torch.manual_seed(seed)
        # Deterministic kernels where they exist, so --seed gives identical CPU outputs.
        torch.use_deterministic_algorithms(True, warn_only=True)
    return np.random.default_rng(seed)


def torch_generator(seed: int):
    """A fresh CPU ``torch.Generator`` seeded with ``seed``."""
    import torch

    return torch.Generator(device="cpu").manual_seed(int(seed))


def ants_random_seed(seed: int) -> int:
    """The seed to hand ANTs for ``--seed``: ANTs reads 0 as "seed from the clock" (measured: not
    reproducible), so shift by one, and stay inside ITK's positive 32-bit range. The one formula
    for every ANTs call (anatomy registration, motion correction)."""
    return int(seed) % (2**31 - 2) + 1
