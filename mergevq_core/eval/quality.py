"""SSIM as the release evaluates it (uint8, skimage) and LPIPS when its VGG16 weights are on disk."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import DataError
from .fid import to_uint8

if TYPE_CHECKING:
    from ..losses import LPIPS


def _win_size(h: int, w: int) -> int:
    """skimage's window: 7, or the largest odd size that fits the shorter side."""
    side = min(h, w)
    if side < 3:
        raise DataError(f"SSIM needs images of at least 3x3 pixels, got {h}x{w}")
    return min(7, side if side % 2 else side - 1)


def ssim(x_hat: Tensor, x: Tensor) -> Tensor:
    """Per-image SSIM (B,) float32 of (B, 3, H, W) images in [-1, 1], computed on uint8 HWC copies with
    `skimage.metrics.structural_similarity(data_range=255, channel_axis=-1)`."""
    from skimage.metrics import structural_similarity

    if x_hat.shape != x.shape or x.dim() != 4:
        raise DataError(f"SSIM needs two (B, 3, H, W) batches of one shape, got {tuple(x_hat.shape)} and {tuple(x.shape)}")
    win = _win_size(x.shape[-2], x.shape[-1])
    a = to_uint8(x_hat).permute(0, 2, 3, 1).cpu().numpy()
    b = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
    vals = [structural_similarity(ai, bi, data_range=255, channel_axis=-1, win_size=win) for ai, bi in zip(a, b)]
    return torch.tensor(vals, dtype=torch.float32)


def lpips_if_available(vgg_weights: str | Path | None) -> LPIPS | None:
    """LPIPS-VGG built from `vgg_weights` (or torchvision's cached vgg16 file when None) if that file exists,
    else None: LPIPS is reported only when its weights are on disk."""
    from ..losses import LPIPS, default_vgg_path

    path = Path(vgg_weights).expanduser() if vgg_weights else default_vgg_path()
    return LPIPS(path) if path.is_file() else None
