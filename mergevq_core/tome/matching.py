"""Bipartite soft matching (ToMe-style token merging) as pure functions.

Shape letters: B batch, T current tokens (incl. cls), N original image tokens
(excl. cls), K kept tokens, C channels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_REDUCTIONS = ("sum", "mean", "amax")


@dataclass(frozen=True)
class MergePlan:
    """Result of one matching step.

    new_index: (B, T) long; position of every current token in the merged
    sequence of length ``t_out = T - r``.
    """

    new_index: Tensor
    r: int
    t_out: int


def identity_plan(batch: int, t: int, device: torch.device | None = None) -> MergePlan:
    new_index = torch.arange(t, device=device).expand(batch, t).contiguous()  # (B, T)
    return MergePlan(new_index=new_index, r=0, t_out=t)


def max_merges(t: int, protect_cls: bool = True) -> int:
    """Largest r one matching step can apply to a sequence of T tokens.

    A = even positions, B = odd positions. With ``protect_cls`` the cls token
    at position 0 is in A but may not merge, leaving ``(T - 1) // 2`` sources.
    Otherwise every A token may merge (``(T + 1) // 2``) provided B is non-empty.
    """
    if protect_cls:
        return max(t - 1, 0) // 2
    return (t + 1) // 2 if t >= 2 else 0


def bipartite_match(metric: Tensor, r: int, protect_cls: bool = True) -> MergePlan:
    """Plan merging ``r`` tokens of A (even positions) into their most similar B
    (odd positions) partner, by cosine similarity of ``metric`` (B, T, c).

    ``r`` is capped at :func:`max_merges`. The merged order is
    [unmerged A tokens in original order, all B tokens in original order], so a
    protected cls token stays at position 0.
    """
    if r < 0:
        raise ValueError(f"r must be non-negative, got {r}")
    bsz, t, _ = metric.shape
    r = min(r, max_merges(t, protect_cls))
    if r == 0:
        return identity_plan(bsz, t, metric.device)

    with torch.no_grad():
        metric = F.normalize(metric.float(), dim=-1)
        a, b = metric[:, ::2], metric[:, 1::2]  # (B, Ta, c), (B, Tb, c)
        scores = a @ b.transpose(1, 2)  # (B, Ta, Tb)
        if protect_cls:
            scores[:, 0, :] = float("-inf")
        best, partner = scores.max(dim=-1)  # (B, Ta)
        order = torch.sort(best, dim=-1, descending=True, stable=True).indices  # (B, Ta)
        src = order[:, :r]  # (B, r) A-local indices that merge
        unm = order[:, r:].sort(dim=-1).values  # (B, Ta - r) keep original order

        n_a, n_b = a.shape[1], b.shape[1]
        n_unm = n_a - r
        device = metric.device
        new_a = torch.empty(bsz, n_a, dtype=torch.long, device=device)
        new_a.scatter_(1, unm, torch.arange(n_unm, device=device).expand(bsz, n_unm))
        new_a.scatter_(1, src, n_unm + partner.gather(1, src))
        new_b = n_unm + torch.arange(n_b, device=device).expand(bsz, n_b)

        new_index = torch.empty(bsz, t, dtype=torch.long, device=device)  # (B, T)
        new_index[:, ::2] = new_a
        new_index[:, 1::2] = new_b
    return MergePlan(new_index=new_index, r=r, t_out=t - r)


def merge(plan: MergePlan, x: Tensor, reduce: str = "sum") -> Tensor:
    """(B, T, C) -> (B, T - r, C), reducing tokens that share a new position."""
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
    bsz, t, c = x.shape
    index = plan.new_index[:, :, None].expand(bsz, t, c)  # (B, T, C)
    out = x.new_zeros(bsz, plan.t_out, c)
    return out.scatter_reduce(1, index, x, reduce=reduce, include_self=False)


def merge_wavg(plan: MergePlan, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge. x (B, T, C), size (B, T, 1) or None (ones).

    Returns the merged x (B, T - r, C) and the new sizes (B, T - r, 1) (sums).
    """
    if size is None:
        size = x.new_ones(x.shape[0], x.shape[1], 1)
    new_size = merge(plan, size, "sum")  # (B, T - r, 1)
    new_x = merge(plan, x * size, "sum") / new_size
    return new_x, new_size


def initial_assign(batch: int, n: int, has_cls: bool = True, device: torch.device | None = None) -> Tensor:
    """(B, N) long: original image token n sits at position n (+1 with a cls)."""
    offset = 1 if has_cls else 0
    return torch.arange(offset, n + offset, device=device).expand(batch, n).contiguous()


def track_assign(plan: MergePlan, assign: Tensor) -> Tensor:
    """assign (B, N): current position holding each original image token.
    Returns the positions after applying ``plan``."""
    return plan.new_index.gather(1, assign)


def canonical_order(assign: Tensor, k: int, offset: int = 1) -> tuple[Tensor, Tensor]:
    """Order merged tokens by the smallest raster position they cover.

    assign (B, N) with values in [offset, offset + K).
    Returns perm (B, K): current token index (minus offset) for each canonical
    slot, and assign_canon (B, N) in [0, K): canonical slot of every original
    token. Slot ids first appear in increasing raster order; slot 0 covers n=0.
    """
    bsz, n = assign.shape
    local = assign - offset  # (B, N) in [0, K)
    raster = torch.arange(n, device=assign.device).expand(bsz, n)
    first = torch.full((bsz, k), n, dtype=torch.long, device=assign.device)
    first = first.scatter_reduce(1, local, raster, reduce="amin", include_self=True)  # (B, K)
    perm = torch.sort(first, dim=1, stable=True).indices  # (B, K)
    rank = torch.empty_like(perm)
    rank.scatter_(1, perm, torch.arange(k, device=assign.device).expand(bsz, k))
    return perm, rank.gather(1, local)


def canonical_assign(scores: Tensor) -> Tensor:
    """The most likely `assign` that a canonical order can produce, from per-position slot scores.

    scores (B, N, K): log-probabilities (or any additive scores) of each original position n belonging to slot k.
    Returns assign (B, N) in [0, K) maximising Σ_n scores[n, assign[n]] subject to the invariants of
    `canonical_order`: slot 0 covers n = 0, slots first appear in increasing raster order, every slot is used
    (so assign[n] ≤ max(assign[:n]) + 1). A per-position argmax ignores them; this is exact (Viterbi over the
    largest slot opened so far, O(N·K)). Needs K ≤ N.
    """
    bsz, n, k = scores.shape
    if k > n:
        raise ValueError(f"{k} slots cannot all be used by {n} positions")
    scores = scores.float()
    dev = scores.device
    neg = torch.finfo(torch.float32).min / 4
    value = torch.full((bsz, k), neg, device=dev)  # value[m]: best total so far with slots 0..m opened
    value[:, 0] = scores[:, 0, 0]
    opened = torch.zeros(bsz, n, k, dtype=torch.bool, device=dev)  # position i opened slot m on the best path
    opened[:, 0, 0] = True
    pad = torch.full((bsz, 1), neg, device=dev)
    for i in range(1, n):
        stay = value + torch.cummax(scores[:, i], dim=1).values  # join the best of the slots 0..m already open
        new = torch.cat([pad, value[:, :-1] + scores[:, i, 1:]], dim=1)  # open slot m here
        opened[:, i] = new > stay
        value = torch.maximum(stay, new)
    out = torch.empty(bsz, n, dtype=torch.long, device=dev)
    m = torch.full((bsz,), k - 1, dtype=torch.long, device=dev)
    rows, slots = torch.arange(bsz, device=dev), torch.arange(k, device=dev)
    for i in range(n - 1, -1, -1):
        took = opened[rows, i, m]
        best_open = scores[:, i].masked_fill(slots > m[:, None], float("-inf")).argmax(dim=1)
        out[:, i] = torch.where(took, m, best_open)
        m = m - took.long()
    return out


def source_matrix(assign: Tensor, k: int) -> Tensor:
    """(B, K, N) float one-hot: S[b, k, n] = 1 iff assign[b, n] == k."""
    return F.one_hot(assign, k).transpose(1, 2).float()


def proportional_attention_bias(size: Tensor | None) -> Tensor | None:
    """log(size) as a (B, 1, 1, T) bias on attention logits (MergeVQ Eq. 14, "+ log s")."""
    if size is None:
        return None
    return size.log().transpose(1, 2)[:, None]  # (B, 1, 1, T)
