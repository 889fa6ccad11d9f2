"""Raster-order generators over the N grid positions: `llamagen` and `mergear`.

Both see the expanded id grid (every position carries its merged group's id, so duplicates are present) and
predict x_0 .. x_{N-1} in raster order.

- `llamagen`: input [class, x_0 .. x_{N-2}], plain causal attention.
- `mergear` (MergeVQ §4.1, Fig. 6): input [class, M, x_0 .. x_{N-2}], where M is the Merge Instruction token,
  a learned embedding indexed by √K (the merged grid side). Attention follows Eq. 12: the query at image
  position i sees image key j iff j <= i and (i - j < w or j is the first occurrence of its id); the prefix is
  always visible. The window w counts the positions a query sees besides the representatives, itself included
  (the sliding-window convention of Mistral): w = G + 1 covers the whole causal 8-neighbourhood of the target.

Decoding runs the N - 1 steps with a KV cache. `cache="sliced"` keeps every token and attends over the live
length; `cache="static"` attends over the whole preallocated buffer under a mask (LlamaGen's layout, a baseline);
`cache="mergear"` is the compressed cache: a Position Cache records each position's representative, a newly
sampled id equal to an earlier one is a duplicate, and a duplicate's KV slot is freed (and reused by the next
token) when it leaves the window. Keys keep their RoPE positions, so no re-rotation is needed, and the cached
context of every step is exactly the Eq. 12 row: MergeAR decoding equals teacher forcing under that mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..models.gpt import GPTConfig, Logits
from ..nn.rope import grid_positions
from .base import Generator, Sampled, first_occurrence, register
from .sampling import Pick

__all__ = ["LlamaGen", "MergeAR", "RasterGenerator", "mergear_mask"]

CACHES = ("sliced", "static", "mergear")


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


class RasterGenerator(Generator):
    """Shared raster layout; `prefix` is 1 (class) or 2 (class, M)."""

    merge_token: bool = False

    def __init__(self, gpt_cfg: GPTConfig) -> None:
        super().__init__(gpt_cfg)
        self.prefix = 2 if self.merge_token else 1
        rows, cols = grid_positions(gpt_cfg.max_len)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    # ---------------------------------------------------------------- layout
    def prefix_embeds(self, labels: Tensor, k: Tensor) -> Tensor:
        """(B, prefix, C): the class token, and for MergeAR the Merge Instruction token of K."""
        return self.gpt.embed_class(labels)[:, None]

    def _rope(self, n: int) -> tuple[Tensor, Tensor]:
        """cos, sin (prefix + n, D/2): identity for the prefix, raster positions 0..n-1 for the image tokens."""
        cos, sin = self.gpt.rope(self.rows[:n], self.cols[:n])
        one, zero = self.gpt.prefix_rope(self.prefix, cos.device)
        return torch.cat([one, cos]), torch.cat([zero, sin])

    def train_mask(self, full: Tensor, assign: Tensor | None = None) -> Tensor | None:
        return None

    def teacher_logits(self, full: Tensor, labels: Tensor, k: Tensor, mask: Tensor | None = None) -> Logits:
        """Teacher forcing over raster ids full (B, N): logits (B, N, V) (tuple if factorised) for x_0..x_{N-1}."""
        N = full.shape[1]
        x = torch.cat([self.prefix_embeds(labels, k), self.gpt.embed_ids(full[:, :-1])], dim=1)  # (B, p+N-1, C)
        cos, sin = self._rope(N - 1)
        h = self.gpt.trunk(x, cos, sin, mask)[:, self.prefix - 1:]  # outputs at the last prefix token and x_0..x_{N-2}
        return self.gpt.logits(h, full)

    def training_logits(self, batch: dict[str, Tensor], generator: torch.Generator | None = None):
        full = self.expand(batch)
        labels = self.labels_for(batch["label"])
        mask = self.train_mask(full, batch["assign"])
        return self.teacher_logits(full, labels, batch["k"], mask), full

    # ---------------------------------------------------------------- decoding
    @torch.no_grad()
    def decode(self, labels: Tensor, k: Tensor | int, pick: Pick, guided: bool = False, cache: str = "sliced",
               window: int | None = None, dtype: torch.dtype | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Generate the N raster ids of each label (B,). `pick(t, i, logits)` chooses sub-token i of target t for
        every row (2B rows with CFG: conditional first, then the null class). Returns ids (B, N) and statistics:
        live KV slots per step and image (`live_history` (N, B)), their peak, the slots allocated (high-water mark)
        and the number of distinct ids. `window` (cache="mergear") defaults to the model's."""
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}")
        B, N, p, dev = labels.shape[0], self.n_tokens, self.prefix, labels.device
        k = torch.as_tensor(k, device=dev).expand(B)
        lab = torch.cat([labels, torch.full_like(labels, self.gpt.null_class)]) if guided else labels
        kk = torch.cat([k, k]) if guided else k
        R = lab.shape[0]
        w = window if window is not None else getattr(self, "window", N)
        compress = cache == "mergear"
        capacity = p + N - 1
        kv = self.gpt.new_cache(R, capacity, dtype=dtype, static=cache == "static")
        ids = torch.zeros(B, N, dtype=torch.long, device=dev)
        live: list[Tensor] = []

        def step(x: Tensor, cos: Tensor, sin: Tensor, t: int, slots: Tensor | None = None) -> None:
            kv.begin(x.shape[1], slots)
            live.append(kv.live()[:B])
            h = self.gpt.trunk(x, cos, sin, cache=kv)[:, -1]
            kv.end()
            ids[:, t] = self.gpt.sample_ids(h, lambda i, lg: pick(t, i, lg))[:B]

        one, zero = self.gpt.prefix_rope(p, dev)
        step(self.prefix_embeds(lab, kk).to(kv.k.dtype), one, zero, 0)
        rep = torch.zeros(B, N, dtype=torch.bool, device=dev)
        rep[:, 0] = True
        slot_of = torch.full((B, N), -1, dtype=torch.long, device=dev)
        n_alloc = torch.full((B,), p, dtype=torch.long, device=dev)
        for t in range(N - 1):
            slots = None
            if compress:  # Eq. 12: position e = t - w leaves query t's window; a duplicate there is forgotten
                e = t - w
                evict = ~rep[:, e] if e >= 0 else torch.zeros(B, dtype=torch.bool, device=dev)
                freed = torch.where(evict, slot_of[:, max(e, 0)], -1)
                kv.free(freed.repeat(2) if guided else freed)
                slot = torch.where(evict, freed, n_alloc)  # x_t reuses the freed slot, else takes a new one
                n_alloc = n_alloc + (~evict).long()
                slot_of[:, t] = slot
                slots = slot.repeat(2) if guided else slot
            x = ids[:, t].repeat(2) if guided else ids[:, t]
            cos, sin = self.gpt.rope(self.rows[t:t + 1], self.cols[t:t + 1])
            step(self.gpt.embed_ids(x[:, None]).to(kv.k.dtype), cos, sin, t + 1, slots)
            rep[:, t + 1] = ~(ids[:, : t + 1] == ids[:, t + 1: t + 2]).any(1)
        n_distinct = rep.sum(1)
        history = torch.stack(live)  # (N, B): slots attended at each step, this step's token included
        stats = {"peak_live_slots": int(history.max()), "live_history": history, "allocated_slots": kv.used, "capacity": kv.capacity,
                 "prefix": p, "window": w if compress else None, "distinct_ids": n_distinct.tolist(),
                 "kv_bytes_per_slot": kv.nbytes() // max(1, kv.capacity)}
        return ids, stats

    @torch.no_grad()
    def generate(self, labels: Tensor, k: int | None = None, pick: Pick | None = None, guided: bool = False,
                 cache: str | None = None, **kw: Any) -> Sampled:
        """Raster ids -> merged tokens in order of first appearance with `assign` from the Position Cache."""
        if pick is None:
            raise ValueError("generate needs a pick function (see SamplingSettings.picker)")
        k = k if k is not None else self.default_k()
        ids, stats = self.decode(labels, k, pick, guided, cache or self.default_cache, **kw)
        merged, kk, assign = group_by_id(ids)
        return Sampled(merged, kk, assign, stats)

    default_cache = "sliced"

    def default_k(self) -> int:
        return self.n_tokens


def group_by_id(full: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Raster ids (B, N) -> merged ids (B, Kmax) in order of first appearance (padded with -1), K (B,) and
    assign (B, N): the rank of each position's first occurrence (the Position Cache's source matrix)."""
    B, N = full.shape
    rep = first_occurrence(full)
    rank = rep.long().cumsum(1) - 1  # rank of each representative
    eq = full[:, :, None] == full[:, None, :]  # (B, N, N)
    first = (eq & rep[:, None, :]).float().argmax(-1)  # position of each position's representative
    assign = rank.gather(1, first)
    k = rep.sum(1)
    merged = torch.full((B, int(k.max())), -1, dtype=full.dtype, device=full.device)
    rows, cols = rep.nonzero(as_tuple=True)
    merged[rows, rank[rows, cols]] = full[rows, cols]
    return merged, k, assign


@register
class LlamaGen(RasterGenerator):
    """LlamaGen: raster AR over the full N ids with a plain causal mask."""

    name = "llamagen"


@register
class MergeAR(RasterGenerator):
    """MergeAR: [class, M, x...] with the Eq. 12 training mask and the compressed KV cache at inference."""

    name = "mergear"
    merge_token = True
    default_cache = "mergear"

    def __init__(self, gpt_cfg: GPTConfig, window: int | None = None, mask_groups: str = "id",
                 default_tokens: int | None = None) -> None:
        super().__init__(gpt_cfg)
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
        return {"window": self.window, "mask_groups": self.mask_groups, "default_tokens": self.default_tokens}

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


def analytic_peak_slots(rep: Tensor, window: int, prefix: int) -> Tensor:
    """Peak live KV slots of MergeAR decoding for raster reps (B, N) bool: max over steps t of
    prefix + #reps among x_0..x_t + #non-reps in the window (t - w, t]."""
    B, N = rep.shape
    reps = rep[:, : N - 1].long().cumsum(1)  # reps among inputs 0..t
    nonrep = (~rep[:, : N - 1]).long().cumsum(1)
    lagged = torch.cat([torch.zeros(B, window, dtype=torch.long, device=rep.device), nonrep], 1)[:, : N - 1]
    live = prefix + reps + nonrep - lagged
    return live.max(1).values


def plain_peak_slots(n_tokens: int, prefix: int) -> int:
    """Peak KV slots of a full cache: every input token stays."""
    return prefix + n_tokens - 1


def mean_context(rep: Tensor, window: int, prefix: int) -> float:
    """Mean attended context of MergeAR decoding over steps and images (for reporting)."""
    B, N = rep.shape
    reps = rep[:, : N - 1].long().cumsum(1)
    nonrep = (~rep[:, : N - 1]).long().cumsum(1)
    lagged = torch.cat([torch.zeros(B, window, dtype=torch.long, device=rep.device), nonrep], 1)[:, : N - 1]
    return float((prefix + reps + nonrep - lagged).float().mean())

