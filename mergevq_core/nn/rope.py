"""2D rotary position embedding (LlamaGen layout) as pure functions.

Shape letters: B batch, H heads, L sequence, D head dim, P = D/2 rotation pairs.
The pairs are interleaved channels (2i, 2i+1). Pairs 0..P/2-1 rotate by the row index, pairs P/2..P-1 by the
column index, both with frequencies base^(-2j/P), j < P/2 (= D/4 frequencies).
A token with no position (the class token) uses cos = 1, sin = 0, an identity rotation. (LlamaGen zeroes the
class token's q and k instead; we don't.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["apply_rope", "grid_positions", "identity_rope", "rope_2d"]


def rope_2d(head_dim: int, rows: Tensor, cols: Tensor, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin of the rotation angles for tokens at grid positions (rows, cols).

    Shapes: rows, cols (L,) or any shape S (e.g. (B, L)), integer or float -> cos, sin (*S, D/2), float32.
    """
    if head_dim % 4 != 0:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    if rows.shape != cols.shape:
        raise ValueError(f"rows {tuple(rows.shape)} and cols {tuple(cols.shape)} must have the same shape")
    pairs = head_dim // 2
    j = torch.arange(pairs // 2, device=rows.device, dtype=torch.float32)
    freqs = base ** (-2.0 * j / pairs)  # (D/4,)
    angles = torch.cat(
        [rows.to(torch.float32)[..., None] * freqs, cols.to(torch.float32)[..., None] * freqs], dim=-1
    )  # (*S, D/2): row pairs first, then column pairs
    return angles.cos(), angles.sin()


def identity_rope(head_dim: int, *shape: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos = 1, sin = 0 of shape (*shape, D/2): the rotation of a token without a position."""
    size = (*shape, head_dim // 2)
    return torch.ones(size, device=device), torch.zeros(size, device=device)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the interleaved channel pairs of x, computed in float32 and cast back to x's dtype.

    Shapes: x (B, H, L, D) or (S, B, H, L, D) (q and k stacked: one rotation for both); cos, sin (L, D/2) shared
    by the batch, or (B, L, D/2) per sample.
    """
    if cos.dim() == 2:
        cos, sin = cos[None, None], sin[None, None]  # (1, 1, L, P)
    elif cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, L, P)
    else:
        raise ValueError(f"cos/sin must be (L, D/2) or (B, L, D/2), got {tuple(cos.shape)}")
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (..., L, P) each: the pairs' two channels
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).to(x.dtype)


def grid_positions(n: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Raster (row, col) of the n slots of a sqrt(n) x sqrt(n) grid: slot t -> (t // G, t % G). Shapes: (n,), (n,)."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"raster positions need a square number of tokens, got {n}")
    t = torch.arange(n, device=device)
    return t // side, t % side
