"""Pixel reconstruction loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def recon_loss(x_hat: Tensor, x: Tensor, kind: str = "l2") -> Tensor:
    """Mean squared (paper, `l2`) or absolute (release, `l1`) error over every element."""
    if kind == "l2":
        return F.mse_loss(x_hat, x)
    if kind == "l1":
        return F.l1_loss(x_hat, x)
    raise ValueError(f"recon kind must be 'l2' or 'l1', got {kind!r}")
