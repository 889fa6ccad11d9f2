"""Convolutional and transformer building blocks.

Shape letters: B batch, T tokens, C channels, H heads, h/w spatial size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def group_norm(channels: int, affine: bool = True, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with 32 groups (taming/MAGVIT-v2), or the largest divisor of 32 for small widths."""
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=eps, affine=affine)


class ResBlock(nn.Module):
    """GN → SiLU → conv3×3 → GN → SiLU → conv3×3, plus a 1×1 shortcut when the width changes."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, h, w) -> (B, C_out, h, w)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """LLaMA's feed-forward: w2(silu(w1 x) * w3 x), no biases, then dropout on its output (LlamaGen's
    ffn_dropout; the only dropout on the FFN path)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class MixFFN(nn.Module):
    """fc1 → depthwise 3×3 conv on the token grid → GELU → fc2 (SegFormer's Mix-FFN)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:  # x: (B, T=h*w, C)
        h = self.fc1(x)
        h = rearrange(h, "b (y x) c -> b c y x", y=grid[0], x=grid[1])
        h = rearrange(self.dwconv(h), "b c y x -> b (y x) c")
        return self.fc2(F.gelu(h))


class Attention(nn.Module):
    """Multi-head self-attention (qkv bias) through SDPA; also returns the keys averaged over heads,
    which ToMe uses as its similarity metric."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, C); bias broadcastable to (B, H, T, T), added to the logits. Returns (out, keys (B, T, C/H))."""
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        if bias is not None:
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, T, d)
        return self.proj(rearrange(out, "b h t d -> b t (h d)")), k.mean(dim=1)


class CrossAttention(nn.Module):
    """Queries (B, Tq, C) attend to a context (B, Tk, C_ctx)."""

    def __init__(self, dim: int, heads: int, ctx_dim: int | None = None, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(ctx_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, ctx: Tensor, mask: Tensor | None = None) -> Tensor:
        """mask: (B, Tk) bool, True where a context token may be attended."""
        q = rearrange(self.q(x), "b t (h d) -> b h t d", h=self.heads)
        k, v = rearrange(self.kv(ctx), "b t (two h d) -> two b h t d", two=2, h=self.heads)
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(rearrange(out, "b h t d -> b t (h d)"))
