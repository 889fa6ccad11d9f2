"""Seed derivation: every random choice in the data layer draws from an explicit `torch.Generator`."""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*values: int) -> int:
    """Hash a tuple of ints (seed, epoch, index, ...) into a well-mixed 63-bit seed; order matters."""
    h = 0x6A09E667F3BCC909
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


def make_generator(*values: int) -> torch.Generator:
    """A CPU generator seeded from `derive_seed(*values)`."""
    return torch.Generator().manual_seed(derive_seed(*values))


def randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform int in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=generator).item())


def uniform(generator: torch.Generator, n: int) -> list[float]:
    """n uniform floats in [0, 1), drawn in one call."""
    return torch.rand(n, generator=generator, dtype=torch.float64).tolist()
