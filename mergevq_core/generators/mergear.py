"""`mergear` (MergeVQ §4.1, Fig. 6): raster AR over the N grid ids with the Merge Instruction token, the Eq. 12
attention mask, and the compressed KV cache that mask allows at inference.

Input [class, M, x_0 .. x_{N-2}], where M is the Merge Instruction token, a learned embedding indexed by √K (the
merged grid side). Attention follows Eq. 12: the query at image position i sees image key j iff j <= i and
(i - j < w or j is the first occurrence of its id); the prefix is always visible. The window w counts the
positions a query sees besides the representatives, itself included (the sliding-window convention of
Mistral): w = G + 1 covers the whole causal 8-neighbourhood of the target.

Decoding (`raster.RasterDecoder` with `cache="mergear"`) keeps a `PositionCache`: each position's representative
and KV slot, so a duplicate's slot is freed when it leaves the window and only prefix + representatives + window
stay live (`live_slots`, the analytic count the benchmark compares the real cache with).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..models.gpt import GPTConfig
from .base import first_occurrence, register
from .raster import RasterGenerator

__all__ = [
    "MergeAR", "PositionCache", "analytic_peak_slots", "live_slots", "mean_context", "mergear_mask", "plain_peak_slots",
]


def mergear_mask(rep: Tensor, window: int, prefix: int) -> Tensor:
    """Eq. 12 over the input sequence [prefix tokens, x_0 .. x_{N-2}]: rep (B, N) bool (first occurrences) ->
    (B, L, L) bool, L = prefix + N - 1, True = may attend."""
    B, N = rep.shape
    L = prefix + N - 1
    a = torch.arange(L, device=rep.device)
    causal = a[None, :] <= a[:, None]  # (L, L) key <= query
    dist = a[:, None] - a[None, :]  # query - key
    is_img_key = a >= prefix
    rep_key = torch.zeros(B, L, dtype=torch.bool, device=rep.device)
    rep_key[:, prefix:] = rep[:, : N - 1]
    visible = (~is_img_key)[None, None, :] | (dist < window)[None] | rep_key[:, None, :]
    return causal[None] & visible


class PositionCache:
    """MergeAR's bookkeeping on the decoding device, as batched tensor operations (shared by the CFG halves, which
    see the same tokens): for each generated position whether it is its id's first occurrence (a representative)
    and its KV slot, and the slots handed out per image. A newly sampled id equal to an earlier one is a duplicate.
    Position e leaves the window of query t when e = t - w; if it is a duplicate its slot goes to the token of step
    t (so no slot is ever left empty, the live slots of image b are exactly [0, n_alloc[b]) and slots allocated =
    peak live slots); a representative keeps its slot forever.

    Nothing here reads a tensor on the host: `t` is the loop counter (an int) or, in a compiled step, a (1,) tensor.
    `top` is a host-side bound on max(n_alloc) (it grows by one per step, capped at `capacity`). A slot at or past
    `capacity` cannot be written: it is clamped and `overflow` is set, and the caller decodes the batch again with a
    full-length cache (the sampling noise is a function of the sample, so the redo draws the same ids)."""

    def __init__(self, batch: int, n: int, prefix: int, window: int, capacity: int,
                 device: torch.device | None = None) -> None:
        self.rep = torch.zeros(batch, n, dtype=torch.bool, device=device)
        self.slot_of = torch.full((batch, n), -1, dtype=torch.long, device=device)
        self.n_alloc = torch.full((batch,), prefix, dtype=torch.long, device=device)
        self.overflow = torch.zeros((), dtype=torch.bool, device=device)
        self.prefix, self.window, self.capacity, self.top = prefix, window, capacity, prefix

    def record(self, t: int | Tensor, new: Tensor, ids: Tensor) -> None:
        """Position t got ids new (B,); ids (B, N) holds the earlier positions and -1 (never an id) elsewhere."""
        _set_col(self.rep, t, ~(ids == new[:, None]).any(1))

    def slot_for(self, t: int | Tensor) -> int | Tensor:
        """The KV slot of input position t: the slot of position t - w if that is a duplicate leaving the window,
        else a new one. Before anything left the window every image gets slot prefix + t, returned as an int."""
        if isinstance(t, int) and t < self.window:
            self.slot_of[:, t] = self.prefix + t
            self.n_alloc += 1
            self.top = self.prefix + t + 1
            return self.prefix + t
        if isinstance(t, int):
            e = t - self.window
            reuse = ~self.rep[:, e]
            old = self.slot_of[:, e]
        else:  # a compiled step: no branch on t
            e = (t - self.window).clamp(min=0)
            reuse = (t >= self.window) & ~self.rep.index_select(1, e)[:, 0]
            old = self.slot_of.index_select(1, e)[:, 0]
        slot = torch.where(reuse, old, self.n_alloc)
        self.n_alloc += (~reuse).long()
        if self.top >= self.capacity or not isinstance(t, int):
            self.overflow |= (slot >= self.capacity).any()
            slot = slot.clamp(max=self.capacity - 1)
        self.top = min(self.top + 1, self.capacity)
        _set_col(self.slot_of, t, slot)
        return slot

    def live_mask(self, keys: int) -> Tensor:
        """(B, keys) bool: the live slots among [0, keys)."""
        return torch.arange(keys, device=self.n_alloc.device)[None] < self.n_alloc[:, None]


def _set_col(x: Tensor, t: int | Tensor, value: Tensor) -> None:
    """x[:, t] = value (B,), for t an int or a (1,) tensor (in place, no host read)."""
    if isinstance(t, int):
        x[:, t] = value
    else:
        x.index_copy_(1, t, value[:, None])


@register
class MergeAR(RasterGenerator):
    """MergeAR: [class, M, x...] with the Eq. 12 training mask and the compressed KV cache at inference."""

    name = "mergear"
    merge_token = True
    default_cache = "mergear"

    def __init__(self, gpt_cfg: GPTConfig, window: int | None = None, mask_groups: str = "id",
                 default_tokens: int | None = None, prefix_rope: str = "identity") -> None:
        super().__init__(gpt_cfg, prefix_rope)
        if mask_groups not in ("id", "source"):
            raise ValueError(f"mask_groups must be id or source, got {mask_groups!r}")
        self.window = window if window is not None else self.grid + 1
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        self.mask_groups = mask_groups
        self.default_tokens = default_tokens
        self.merge_embed = nn.Embedding(self.grid + 1, gpt_cfg.dim)  # indexed by √K in [1, G]
        nn.init.normal_(self.merge_embed.weight, std=0.02)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "window": self.window, "mask_groups": self.mask_groups,
                "default_tokens": self.default_tokens}

    def default_k(self) -> int:
        return self.default_tokens or self.n_tokens

    def side_of(self, k: Tensor) -> Tensor:
        """√K rounded to the nearest grid side in [1, G]."""
        return k.float().sqrt().round().long().clamp(1, self.grid)

    def prefix_embeds(self, labels: Tensor, k: Tensor) -> Tensor:
        m = self.merge_embed(self.side_of(k.to(labels.device)))
        return torch.stack([self.gpt.embed_class(labels), m], dim=1)

    def train_mask(self, full: Tensor, assign: Tensor | None = None) -> Tensor:
        groups = assign if self.mask_groups == "source" and assign is not None else full
        return mergear_mask(first_occurrence(groups), self.window, self.prefix)

    def summarize_stats(self, per_batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Adds the compressed cache's peak live slots (over all batches) next to a full cache's, and the distinct
        ids per image (mean, min, max), with the window they were decoded under."""
        distinct = [d for s in per_batch for d in s["distinct_ids"]]
        return {**super().summarize_stats(per_batch),
                "peak_cache_slots": max(s["peak_live_slots"] for s in per_batch),
                "plain_cache_slots": plain_peak_slots(self.n_tokens, self.prefix),
                "distinct_ids": sum(distinct) / len(distinct), "distinct_ids_min": min(distinct),
                "distinct_ids_max": max(distinct), "window": self.window}


def live_slots(rep: Tensor, window: int, prefix: int) -> Tensor:
    """Live KV slots of MergeAR decoding at each step t (input x_t), for raster reps (B, N) bool: prefix +
    representatives among x_0..x_t + duplicates in the window (t - w, t]. Returns (B, N - 1)."""
    B, N = rep.shape
    reps = rep[:, : N - 1].long().cumsum(1)
    nonrep = (~rep[:, : N - 1]).long().cumsum(1)
    lagged = torch.cat([torch.zeros(B, window, dtype=torch.long, device=rep.device), nonrep], 1)[:, : N - 1]
    return prefix + reps + nonrep - lagged


def analytic_peak_slots(rep: Tensor, window: int, prefix: int) -> Tensor:
    """Peak live KV slots of MergeAR decoding per image, (B,)."""
    return live_slots(rep, window, prefix).max(1).values


def plain_peak_slots(n_tokens: int, prefix: int) -> int:
    """Peak KV slots of a full cache: every input token stays."""
    return prefix + n_tokens - 1


def mean_context(rep: Tensor, window: int, prefix: int) -> float:
    """Mean attended context of MergeAR decoding over steps and images (for reporting)."""
    return float(live_slots(rep, window, prefix).float().mean())
