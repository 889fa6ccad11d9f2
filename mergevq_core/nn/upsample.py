"""×2 upsampling by a 3×3 conv to 4C channels followed by depth-to-space."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


class DepthToSpaceUpsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, h, w) -> (B, C, 2h, 2w)
        # DCR order (channel = (dy*2 + dx)*C + c) as the release; PixelShuffle differs by a fixed permutation.
        y = self.conv(x)
        if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
            # the same values, rearranged in NHWC memory so that the result stays channels_last
            nhwc = rearrange(y.permute(0, 2, 3, 1), "b h w (dy dx c) -> b (h dy) (w dx) c", dy=2, dx=2)
            return nhwc.permute(0, 3, 1, 2)
        return rearrange(y, "b (dy dx c) h w -> b c (h dy) (w dx)", dy=2, dx=2)
