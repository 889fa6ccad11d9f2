"""MergeVQ decoder: full-length recovered codes → image. Self-attention with MixFFN on the N-token grid, then
AdaGN-modulated ResBlocks and depth-to-space upsampling (no ToMe, no cross-attention, as the release).

Shape letters: B batch, N tokens (g×g grid), D code bits, C width.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..config import DecoderConfig
from ..nn import Attention, DepthToSpaceUpsample, LayerScale, MixFFN, ResBlock, group_norm


class MixBlock(nn.Module):
    """Pre-LN block: self-attention + MixFFN (depthwise conv on the token grid gives position)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, layer_scale: float, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.ffn = MixFFN(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:  # (B, N, C)
        x = x + self.ls1(self.attn(self.norm1(x))[0])
        return x + self.ls2(self.ffn(self.norm2(x), grid))


class AdaGN(nn.Module):
    """GroupNorm without affine, scaled by a linear map of the spatial std of z and shifted by one of its mean.
    std = sqrt(var + 1e-6) over the g×g positions, the variance unbiased (÷ (g² − 1), the release) or biased (÷ g²,
    `unbiased=False`, configs before version 2)."""

    def __init__(self, code_dim: int, channels: int, unbiased: bool = True) -> None:
        super().__init__()
        self.unbiased = unbiased
        self.norm = group_norm(channels, affine=False)
        self.scale = nn.Linear(code_dim, channels)
        self.shift = nn.Linear(code_dim, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Start as a plain GroupNorm (scale 1, shift 0). A small random init would multiply every level's
        features by ~0.05 and stall early training."""
        for lin, bias in ((self.scale, 1.0), (self.shift, 0.0)):
            nn.init.zeros_(lin.weight)
            nn.init.constant_(lin.bias, bias)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:  # x (B, C, h, w), z (B, D, g, g)
        mean = z.mean(dim=(2, 3))  # (B, D)
        unbiased = self.unbiased and z.shape[2] * z.shape[3] > 1  # one position has no unbiased variance
        std = (z.var(dim=(2, 3), unbiased=unbiased) + 1e-6).sqrt()
        return self.norm(x) * self.scale(std)[..., None, None] + self.shift(mean)[..., None, None]


class Level(nn.Module):
    def __init__(self, code_dim: int, c_in: int, c_out: int, n_blocks: int, upsample: bool, unbiased: bool = True) -> None:
        super().__init__()
        self.adagn = AdaGN(code_dim, c_in, unbiased)
        self.blocks = nn.ModuleList(ResBlock(c_in if i == 0 else c_out, c_out) for i in range(n_blocks))
        self.upsample = DepthToSpaceUpsample(c_out) if upsample else None

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        x = self.adagn(x, z)
        for block in self.blocks:
            x = block(x)
        return self.upsample(x) if self.upsample is not None else x


class Decoder(nn.Module):
    """`norm_eps`: the transformer blocks' LayerNorm eps (`model.norm_eps`)."""

    def __init__(self, cfg: DecoderConfig, code_dim: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(code_dim, cfg.dim, 3, padding=1)
        self.cpe = nn.Conv2d(cfg.dim, cfg.dim, 3, padding=1, groups=cfg.dim)  # conditional position encoding
        self.blocks = nn.ModuleList(
            MixBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.layer_scale, norm_eps) for _ in range(cfg.depth)
        )
        levels = []
        c_in = cfg.dim
        for i in reversed(range(len(cfg.ch_mult))):  # top level first
            c_out = cfg.ch * cfg.ch_mult[i]
            n_blocks = cfg.num_res_blocks if i == 0 else cfg.num_res_blocks + 1
            levels.append(Level(code_dim, c_in, c_out, n_blocks, upsample=i > 0, unbiased=cfg.adagn_unbiased))
            c_in = c_out
        self.levels = nn.ModuleList(levels)
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """z (B, D, g, g): the recovered full-length code grid (raster order). Returns (B, 3, H, W)."""
        g = (z.shape[2], z.shape[3])
        x = self.conv_in(z)
        x = x + self.cpe(x)
        x = rearrange(x, "b c h w -> b (h w) c")  # (B, N, C)
        for block in self.blocks:
            x = block(x, g)
        x = rearrange(x, "b (h w) c -> b c h w", h=g[0], w=g[1])
        for level in self.levels:
            x = level(x, z)
        return self.conv_out(F.silu(self.norm_out(x)))


def recover_full(quantized: Tensor, assign: Tensor) -> Tensor:
    """Token recovery full = Sᵀq: every original position receives its merged token's code.

    Shapes: quantized (B, K, D), assign (B, N) in [0, K) → (B, N, D). Differentiable in `quantized`."""
    return quantized.gather(1, assign[..., None].expand(-1, -1, quantized.shape[-1]))


def to_grid(full: Tensor) -> Tensor:
    """(B, N, D) raster tokens → (B, D, g, g)."""
    g = int(round(full.shape[1] ** 0.5))
    return rearrange(full, "b (h w) d -> b d h w", h=g, w=g)

