"""Image-quality metrics on tensors in [-1, 1]."""

from __future__ import annotations

import torch
from torch import Tensor


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] → [0, 1], clamped."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(x_hat: Tensor, x: Tensor) -> Tensor:
    """Per-image PSNR in dB (B,) on images mapped to [0, 1] (peak 1)."""
    mse = (to_unit(x_hat) - to_unit(x)).square().flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))
