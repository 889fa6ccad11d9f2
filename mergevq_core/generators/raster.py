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
        dec = RasterDecoder(self, labels, k, guided, cache, window, dtype)
        dec.prefill(pick)
        for t in range(self.n_tokens - 1):
            dec.step(t, pick)
        return dec.ids, dec.stats()

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


class PositionCache:
    """MergeAR's bookkeeping per image, on the host (shared by the CFG halves, which see the same tokens): for each
    generated position its id's first position (its representative) and its KV slot. A newly sampled id equal to
    an earlier one is a duplicate. Position e leaves the window of query t when e = t - w; if it is a duplicate
    its slot goes to the token of step t (so no slot is ever left empty and slots allocated = peak live slots);
    a representative keeps its slot forever."""

    def __init__(self, batch: int, n: int, prefix: int, window: int) -> None:
        self.first: list[dict[int, int]] = [{} for _ in range(batch)]
        self.rep = [[False] * n for _ in range(batch)]
        self.slot_of = [[-1] * n for _ in range(batch)]
        self.n_alloc = [prefix] * batch  # slots handed out per image
        self.window = window

    def record(self, t: int, ids: list[int]) -> None:
        """Position t got ids (one per image)."""
        for b, x in enumerate(ids):
            if x not in self.first[b]:
                self.first[b][x] = t
                self.rep[b][t] = True

    def slot_for(self, t: int) -> list[int]:
        """The KV slot of input position t for each image: the slot of position t - w if that is a duplicate
        leaving the window, else a new one."""
        e, out = t - self.window, []
        for b in range(len(self.n_alloc)):
            if e >= 0 and not self.rep[b][e]:
                slot = self.slot_of[b][e]
            else:
                slot = self.n_alloc[b]
                self.n_alloc[b] += 1
            self.slot_of[b][t] = slot
            out.append(slot)
        return out

    def rep_tensor(self, device: torch.device | None = None) -> Tensor:
        return torch.tensor(self.rep, dtype=torch.bool, device=device)


class RasterDecoder:
    """Stateful raster decoding with one of three caches (see the module docstring): `prefill(pick)` samples x_0,
    `step(t, pick)` feeds x_t and samples x_{t+1}; `fast_forward(tokens)` feeds x_0..x_{T-1} in one parallel pass
    (a benchmark's way to reach position T quickly; then only Eq. 12's window and representatives stay)."""

    def __init__(self, gen: "RasterGenerator", labels: Tensor, k: Tensor | int, guided: bool = False,
                 cache: str = "sliced", window: int | None = None, dtype: torch.dtype | None = None,
                 capacity: int | None = None) -> None:
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}")
        self.gen, self.guided, self.cache_kind = gen, guided, cache
        B, N, p, dev = labels.shape[0], gen.n_tokens, gen.prefix, labels.device
        self.B, self.N, self.p = B, N, p
        k = torch.as_tensor(k, device=dev).expand(B)
        self.labels = torch.cat([labels, torch.full_like(labels, gen.gpt.null_class)]) if guided else labels
        self.k = torch.cat([k, k]) if guided else k
        self.window = window if window is not None else getattr(gen, "window", N)
        self.compress = cache == "mergear"
        full = p + N - 1
        if capacity is None:
            capacity = min(full, p + self.window + int(k.max()) + 8) if self.compress else full
        self.kv = gen.gpt.new_cache(self.labels.shape[0], capacity, dtype=dtype, static=cache == "static")
        self.pos = PositionCache(B, N, p, self.window) if self.compress else None
        self.ids = torch.zeros(B, N, dtype=torch.long, device=dev)
        self.live: list[Tensor] = []

    def _rows(self, x: Tensor) -> Tensor:
        return x.repeat(2, *([1] * (x.dim() - 1))) if self.guided else x

    def _run(self, x: Tensor, cos: Tensor, sin: Tensor, t_next: int, pick: Pick, slots: Tensor | None = None) -> None:
        kv = self.kv
        if slots is not None and max(slots) >= kv.capacity:
            kv.resize(min(self.p + self.N - 1, max(max(slots) + 1, kv.capacity * 3 // 2 + 8)))
        kv.begin(x.shape[1], slots)
        self.live.append(kv.live()[: self.B])
        h = self.gen.gpt.trunk(x.to(kv.k.dtype), cos, sin, cache=kv)[:, -1]
        kv.end()
        new = self.gen.gpt.sample_ids(h, lambda i, lg: pick(t_next, i, lg))[: self.B]
        self.ids[:, t_next] = new
        if self.pos is not None:
            self.pos.record(t_next, new.tolist())

    def prefill(self, pick: Pick) -> None:
        one, zero = self.gen.gpt.prefix_rope(self.p, self.labels.device)
        self._run(self.gen.prefix_embeds(self.labels, self.k), one, zero, 0, pick)

    def step(self, t: int, pick: Pick) -> None:
        slots = None
        if self.pos is not None:
            slots = self.pos.slot_for(t)
            slots = slots * 2 if self.guided else slots
        x = self._rows(self.ids[:, t])
        cos, sin = self.gen.gpt.rope(self.gen.rows[t:t + 1], self.gen.cols[t:t + 1])
        self._run(self.gen.gpt.embed_ids(x[:, None]), cos, sin, t + 1, pick, slots)

    def fast_forward(self, tokens: Tensor, pick: Pick) -> None:
        """After `prefill`: feed x_0..x_{T-1} = tokens (B, T) in one pass and sample x_T. With the compressed cache
        the duplicates that already left the window are then freed and the live slots compacted, which is the
        cache state (up to slot order) of step-by-step decoding; keys are computed under the causal mask, so
        values differ from it, but sizes and costs are the same."""
        T = tokens.shape[1]
        if T < 1 or T >= self.N:
            raise ValueError(f"fast_forward needs 1 <= T < N={self.N}, got {T}")
        self.ids[:, :T] = tokens
        if self.kv.capacity < self.p + T:
            self.kv.resize(self.p + T)
        cos, sin = self.gen.gpt.rope(self.gen.rows[:T], self.gen.cols[:T])
        pos = self.pos
        if pos is not None:  # x_0 was recorded by prefill; x_1..x_{T-1} now, in their contiguous slots
            listed = tokens.tolist()
            for t in range(1, T):
                pos.record(t, [row[t] for row in listed])
            for b in range(self.B):
                pos.slot_of[b][:T] = list(range(self.p, self.p + T))
                pos.n_alloc[b] = self.p + T
        self._run(self.gen.gpt.embed_ids(self._rows(tokens)), cos, sin, T, pick)
        if pos is not None:
            last = T - 1 - self.window  # positions <= last have left the window of query T - 1
            gone = [[pos.slot_of[b][j] if not pos.rep[b][j] else -1 for j in range(last + 1)] for b in range(self.B)]
            if last >= 0:
                self.kv.free(self._rows(torch.tensor(gone, dtype=torch.long, device=self.ids.device)))
            new_index = self.kv.compact()[: self.B].tolist()
            for b in range(self.B):
                pos.slot_of[b][:T] = [new_index[b][s_] if s_ >= 0 else -1 for s_ in pos.slot_of[b][:T]]
                pos.n_alloc[b] = sum(1 for s_ in new_index[b] if s_ >= 0)
            self.kv.resize(max(self.kv.used, min(self.p + self.N - 1, self.kv.used + self.window + 8)))

    def stats(self) -> dict[str, Any]:
        history = torch.stack(self.live)  # (steps, B): slots attended at each step, this step's token included
        return {"peak_live_slots": int(history.max()), "live_history": history, "allocated_slots": self.kv.used,
                "capacity": self.kv.capacity, "prefix": self.p, "window": self.window if self.compress else None,
                "distinct_ids": first_occurrence(self.ids).sum(1).tolist(),
                "kv_bytes_per_slot": self.kv.nbytes() // max(1, self.kv.capacity)}


def group_by_id(full: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Raster ids (B, N) -> merged ids (B, Kmax) in order of first appearance (padded with -1), K (B,) and
    assign (B, N): the rank of each position's first occurrence (the Position Cache's source matrix).
    O(N log N) per row (a sort), so N = 1024 at batch 64 stays cheap."""
    B, N = full.shape
    pos = torch.arange(N, device=full.device)
    rows: list[tuple[Tensor, Tensor]] = []
    for b in range(B):
        uniq, inv = torch.unique(full[b], return_inverse=True)  # sorted by value
        first = torch.full((len(uniq),), N, device=full.device).scatter_reduce(0, inv, pos, "amin")
        order = first.argsort()  # canonical order: by first raster position
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=full.device)
        rows.append((uniq[order], rank[inv]))
    k = torch.tensor([len(u) for u, _ in rows], device=full.device)
    merged = torch.full((B, int(k.max())), -1, dtype=full.dtype, device=full.device)
    for b, (u, _) in enumerate(rows):
        merged[b, : len(u)] = u
    return merged, k, torch.stack([a for _, a in rows])


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
