"""Source recovery model (paper Eq. 8-9): predict, from the K quantized tokens alone, which merged token each of
the N original positions belongs to. N learnable queries attend to the tokens (MaskFormer-style decoder) and
classify over the K tokens by a dot product. Trained in stage 1 with CE against `assign`; RandAR uses it to
expand generated tokens.

Shape letters: B batch, N queries (original positions), K merged tokens, D code bits, C width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RecoveryConfig
from ..nn import Attention, CrossAttention, Mlp


def slot_position_embedding(k: int, dim: int, device: torch.device | str | None = None) -> Tensor:
    """Fixed 2D sin-cos embedding (K, C) of the canonical √K×√K slot grid, coordinates normalised to [0, 1)
    so that one model serves every K. The release gives the tokens no position at all; in canonical order
    the slot position is a strong hint of where a token lies, and identical codes stay distinguishable."""
    side = math.isqrt(k)
    yy, xx = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    coords = torch.stack([yy.flatten(), xx.flatten()], dim=-1).float() / side  # (K, 2)
    n_freq = dim // 4
    freqs = torch.pi * 2.0 ** torch.arange(n_freq, device=device).float().clamp(max=16)  # (F,)
    angles = coords[:, :, None] * freqs  # (K, 2, F)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (K, 4F)
    return F.pad(emb, (0, dim - emb.shape[1]))


class RecoveryBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, self_attn: bool) -> None:
        super().__init__()
        self.norm_sa = nn.LayerNorm(dim) if self_attn else None
        self.self_attn = Attention(dim, heads) if self_attn else None
        self.norm_q = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q: Tensor, ctx: Tensor) -> Tensor:  # q (B, N, C), ctx (B, K, C)
        if self.self_attn is not None:
            q = q + self.self_attn(self.norm_sa(q))[0]
        q = q + self.cross(self.norm_q(q), ctx)
        return q + self.mlp(self.norm_mlp(q))


class SourceRecovery(nn.Module):
    def __init__(self, cfg: RecoveryConfig, code_dim: int, n_tokens: int) -> None:
        super().__init__()
        self.embed = nn.Linear(code_dim, cfg.dim)
        self.embed_norm = nn.LayerNorm(cfg.dim)
        self.queries = nn.Parameter(torch.zeros(1, n_tokens, cfg.dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.blocks = nn.ModuleList(RecoveryBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.self_attn) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.dim)  # shared by queries and tokens (release)

    def forward(self, quantized: Tensor) -> Tensor:
        """quantized (B, K, D) in canonical order → logits (B, N, K) over which slot holds each position."""
        b, k, _ = quantized.shape
        ctx = self.embed_norm(self.embed(quantized)) + slot_position_embedding(k, self.head.in_features, quantized.device)
        q = self.queries.expand(b, -1, -1)
        for block in self.blocks:
            q = block(q, ctx)
        q, ctx = self.head(self.norm_out(q)), self.head(self.norm_out(ctx))
        return q @ ctx.transpose(1, 2) / math.sqrt(q.shape[-1])  # (B, N, K); the release leaves it unscaled

    def loss(self, logits: Tensor, assign: Tensor) -> Tensor:
        """Cross-entropy over the K slots against the true source (B, N) (paper Eq. 9)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), assign.flatten())
