"""Lookup-free quantiser (MAGVIT-v2 / MergeVQ).

Each token z (D,) is quantised bitwise to q = sign(z) ∈ {-1, +1}^D (0 → -1),
no scaling. The implicit codebook has V = 2^D entries and the index of q is
LSB-first: index = Σ_k [q_k > 0] · 2^k (channel 0 is the least significant bit).

Input layout is channels-last (B, K, D), or any (..., D). Conv-style feature
maps (B, D, h, w) must be rearranged by the caller, e.g.
``rearrange(x, "b d h w -> b (h w) d")``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .entropy import codebook_entropy, per_sample_entropy

__all__ = ["QuantOut", "LFQ", "codes_to_indices", "indices_to_codes"]

MAX_INDEX_BITS = 63  # indices are int64


class QuantOut(NamedTuple):
    quantized: Tensor  # (..., D) ±1 values, straight-through gradient to z
    indices: Tensor  # (...) int64, LSB-first
    commit_loss: Tensor  # scalar, mean((z - sg[q])^2)
    sample_entropy: Tensor  # scalar, mean_tokens H(p(·|z)) in nats
    codebook_entropy: Tensor  # scalar, H(mean_tokens p(·|z)) in nats
    entropy_loss: Tensor  # scalar, w_s · sample_entropy − w_c · codebook_entropy


def _bit_weights(dim: int, device: torch.device) -> Tensor:
    if not 1 <= dim <= MAX_INDEX_BITS:
        raise ValueError(f"code dim must be in [1, {MAX_INDEX_BITS}], got {dim}")
    return torch.ones(dim, dtype=torch.int64, device=device) << torch.arange(
        dim, dtype=torch.int64, device=device
    )  # (D,) 2^k


def codes_to_indices(codes: Tensor) -> Tensor:
    """(..., D) codes (only the sign matters, > 0 is bit 1) -> (...) int64."""
    weights = _bit_weights(codes.shape[-1], codes.device)  # (D,)
    return ((codes > 0).long() * weights).sum(-1)


def indices_to_codes(indices: Tensor, dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(...) integer indices -> (..., D) codes in {-1, +1}, LSB-first."""
    weights = _bit_weights(dim, indices.device)  # (D,)
    bits = (indices.long().unsqueeze(-1) & weights) != 0  # (..., D)
    return bits.to(dtype) * 2 - 1


class LFQ(nn.Module):
    """Parameter-free lookup-free quantiser.

    The entropy terms are returned unweighted plus a combined
    ``entropy_loss = sample_entropy_weight · sample − codebook_entropy_weight · codebook``;
    the caller applies the overall weights. For reference the release uses
    entropy_loss (1.0, 1.0) × 0.1 and commit_loss × 0.25, with temperature 0.01.
    ``groups`` > 1 replaces the joint codebook entropy by the sum of per-group
    entropies over D/groups-bit sub-codebooks (needed when 2^D is too large).
    """

    def __init__(
        self,
        dim: int,
        temperature: float = 0.01,
        groups: int = 1,
        sample_entropy_weight: float = 1.0,
        codebook_entropy_weight: float = 1.0,
        entropy_chunk: int = 4096,
    ) -> None:
        super().__init__()
        if not 1 <= dim <= MAX_INDEX_BITS:
            raise ValueError(f"dim must be in [1, {MAX_INDEX_BITS}], got {dim}")
        if groups < 1 or dim % groups != 0:
            raise ValueError(f"groups={groups} must divide dim={dim}")
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.dim = dim
        self.temperature = temperature
        self.groups = groups
        self.sample_entropy_weight = sample_entropy_weight
        self.codebook_entropy_weight = codebook_entropy_weight
        self.entropy_chunk = entropy_chunk

    @property
    def codebook_size(self) -> int:
        return 2**self.dim

    def extra_repr(self) -> str:
        return f"dim={self.dim}, temperature={self.temperature}, groups={self.groups}"

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        return indices_to_codes(indices, self.dim)

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        return codes_to_indices(codes)

    def forward(self, z: Tensor, compute_entropy: bool = True) -> QuantOut:
        """z: (B, K, D) or any (..., D) with D == dim."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected last dim {self.dim}, got shape {tuple(z.shape)}")
        q = torch.where(z > 0, 1.0, -1.0).to(z.dtype)  # (..., D), 0 -> -1
        quantized = z + (q - z).detach()  # straight-through estimator
        indices = codes_to_indices(q)  # (...)
        commit_loss = (z - q.detach()).pow(2).mean()

        if compute_entropy:
            sample_h = per_sample_entropy(z, self.temperature)
            codebook_h = codebook_entropy(z, self.temperature, self.groups, self.entropy_chunk)
        else:
            sample_h = z.new_zeros((), dtype=torch.promote_types(z.dtype, torch.float32))
            codebook_h = torch.zeros_like(sample_h)
        entropy_loss = (
            self.sample_entropy_weight * sample_h - self.codebook_entropy_weight * codebook_h
        )
        return QuantOut(quantized, indices, commit_loss, sample_h, codebook_h, entropy_loss)
