"""Exact entropy terms for lookup-free quantisation (LFQ).

The implicit codebook is C = {-1, +1}^D (V = 2^D codes) and a token z (D,) is
softly assigned with p(c|z) ∝ exp(2<z, c> / τ). Since <z, c> = Σ_k z_k c_k the
distribution factorises over bits: P(c_k = +1 | z) = sigmoid(4 z_k / τ).

Code indices are LSB-first: index(c) = Σ_k [c_k > 0] · 2^k.

Everything here is exact (no sampling, no clamping) and never materialises a
[tokens, 2^D] tensor: the codebook marginal is the product of a low-bit and a
high-bit table, so the token average is a chunked matmul of two
[chunk, 2^(D/2)] tables.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "bit_log_probs",
    "per_sample_entropy",
    "codebook_probs",
    "codebook_entropy",
    "entropy_of",
]

MAX_JOINT_BITS = 28  # 2^28 floats = 1 GiB for avg_p; beyond that use groups


def _as_float(z: Tensor) -> Tensor:
    # half-precision logsigmoid / exp tables lose too much; compute in >= fp32
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def bit_log_probs(z: Tensor, inv_temperature: float) -> tuple[Tensor, Tensor]:
    """Per-bit log P(bit = +1 | z) and log P(bit = -1 | z), each shaped like z.

    From p(c|z) ∝ exp(2 <z, c> · inv_temperature): the bit logit is 4 z_k / τ.
    logsigmoid keeps both finite and accurate at saturation.
    """
    logits = 4.0 * inv_temperature * z
    return F.logsigmoid(logits), F.logsigmoid(-logits)


def per_sample_entropy(z: Tensor, temperature: float = 0.01) -> Tensor:
    """Mean over tokens of H(p(·|z)) in nats; input (..., D), output scalar.

    H(p(·|z)) = Σ_k H_b(P(bit k = +1 | z)) exactly, because bits are independent.
    """
    z = _as_float(z)
    logp1, logp0 = bit_log_probs(z, 1.0 / temperature)  # (..., D)
    # exp(l) · l → 0 as l → -inf, and stays finite for any finite l: no NaNs
    h = -(logp1.exp() * logp1 + logp0.exp() * logp0)  # (..., D)
    return h.sum(-1).mean()


def _log_code_table(logp1: Tensor, logp0: Tensor) -> Tensor:
    """(n, b) per-bit log-probs -> (n, 2^b) log p over the 2^b codes, LSB-first.

    Built by doubling: appending bit k as [bit=0 block, bit=1 block] gives
    new index = old index + 2^k · bit. Each entry is an exact sum of b terms.
    """
    table = logp1.new_zeros(logp1.shape[0], 1)  # (n, 1): zero bits, log 1
    for k in range(logp1.shape[1]):
        table = torch.cat([table + logp0[:, k : k + 1], table + logp1[:, k : k + 1]], dim=1)
    return table


def _chunk_joint(z: Tensor, inv_temperature: float, d_lo: int) -> Tensor:
    """Σ over the chunk's tokens of p(c|z), as (2^D2, 2^D1) [hi, lo]."""
    logp1, logp0 = bit_log_probs(z, inv_temperature)  # (n, D)
    p_lo = _log_code_table(logp1[:, :d_lo], logp0[:, :d_lo]).exp()  # (n, 2^D1)
    p_hi = _log_code_table(logp1[:, d_lo:], logp0[:, d_lo:]).exp()  # (n, 2^D2)
    return p_hi.transpose(0, 1) @ p_lo  # (2^D2, 2^D1)


def codebook_probs(z: Tensor, temperature: float = 0.01, chunk: int = 4096) -> Tensor:
    """avg_p = mean over tokens of p(·|z): flat (2^D,) in index order (LSB-first).

    Input (..., D), flattened to tokens. Exact; peak memory
    O(chunk · 2^ceil(D/2) + 2^D). When autograd is on, each chunk is
    checkpointed so the backward pass keeps only the input tokens, not the
    [n, 2^(D/2)] tables. Meant for D ≤ ~24 (avg_p itself is 2^D floats).
    """
    z = _as_float(z)
    d = z.shape[-1]
    if d > MAX_JOINT_BITS:
        raise ValueError(f"codebook_probs: D={d} > {MAX_JOINT_BITS}; use groups")
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    zf = z.reshape(-1, d)  # (n, D)
    n = zf.shape[0]
    if n == 0:
        raise ValueError("codebook_probs needs at least one token")
    d_lo = (d + 1) // 2
    inv_t = 1.0 / temperature
    use_ckpt = torch.is_grad_enabled() and zf.requires_grad
    total = zf.new_zeros(2 ** (d - d_lo), 2**d_lo)  # (2^D2, 2^D1) [hi, lo]
    for start in range(0, n, chunk):
        zc = zf[start : start + chunk]
        if use_ckpt:
            part = checkpoint(_chunk_joint, zc, inv_t, d_lo, use_reentrant=False)
        else:
            part = _chunk_joint(zc, inv_t, d_lo)
        total = total + part
    # row-major [hi, lo] flattens to hi · 2^D1 + lo = the LSB-first index
    return (total / n).reshape(-1)


def entropy_of(p: Tensor, dim: int = -1) -> Tensor:
    """Exact Shannon entropy -Σ p log p (nats) with 0 log 0 = 0.

    Differentiable with zero gradient at entries that are exactly 0 (the
    where-trick; torch.xlogy(p, p) would give NaN gradients there). Note the
    MergeVQ/MAGVIT release clamps p at 1e-5 inside the log, which biases the
    codebook entropy; we do not.
    """
    safe = torch.where(p > 0, p, torch.ones_like(p))
    return -(p * safe.log()).sum(dim)


def codebook_entropy(
    z: Tensor, temperature: float = 0.01, groups: int = 1, chunk: int = 4096
) -> Tensor:
    """Entropy H(avg_p) of the token-averaged code distribution; scalar, nats.

    With groups G > 1 the D bits are split into G contiguous groups of D/G bits
    and the result is Σ_g H(avg_p_g) over each group's 2^(D/G) codes (an upper
    bound on the joint entropy). G = 1 is the exact joint codebook entropy.
    """
    d = z.shape[-1]
    if groups < 1 or d % groups != 0:
        raise ValueError(f"groups={groups} must divide D={d}")
    if groups == 1:
        return entropy_of(codebook_probs(z, temperature, chunk))
    zg = z.reshape(-1, groups, d // groups)  # (n, G, D/G)
    per_group = [entropy_of(codebook_probs(zg[:, g], temperature, chunk)) for g in range(groups)]
    return torch.stack(per_group).sum()
