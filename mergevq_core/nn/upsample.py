"""×2 upsampling by a 3×3 conv to 4C channels followed by depth-to-space."""

from __future__ import annotations

from torch import Tensor, nn
from einops import rearrange


class DepthToSpaceUpsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, h, w) -> (B, C, 2h, 2w)
        # DCR order (channel = (dy*2 + dx)*C + c) as the release; PixelShuffle differs by a fixed permutation.
        return rearrange(self.conv(x), "b (dy dx c) h w -> b c (h dy) (w dx)", dy=2, dx=2)
