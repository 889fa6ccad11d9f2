"""Raster-order generators over the N grid positions: the shared layout and decoder, and `llamagen`.

Raster generators see the expanded id grid (every position carries its merged group's id, so duplicates are
present) and predict x_0 .. x_{N-1} in raster order from the input [prefix, x_0 .. x_{N-2}].

- `llamagen`: prefix [class], plain causal attention.
- `mergear` (in `mergear.py`): prefix [class, M] and the Eq. 12 mask.

Decoding runs the N - 1 steps with a KV cache. `cache="sliced"` keeps every token and attends over the live
length; `cache="static"` attends over the whole preallocated buffer under a mask (LlamaGen's layout, a baseline);
`cache="mergear"` is MergeAR's compressed cache: a Position Cache (`mergear.PositionCache`) records each
position's representative, a newly sampled id equal to an earlier one is a duplicate, and a duplicate's KV slot
is freed (and reused by the next token) when it leaves the window. Keys keep their RoPE positions, so no
re-rotation is needed, and the cached context of every step is exactly the Eq. 12 row: MergeAR decoding equals
teacher forcing under that mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..models.gpt import GPTConfig, Logits
from ..nn.rope import grid_positions
from .base import Generator, Sampled, first_occurrence, register
from .noise import SampleNoise
from .sampling import Pick

__all__ = ["CACHES", "LlamaGen", "RasterDecoder", "RasterGenerator", "group_by_id"]

CACHES = ("sliced", "static", "mergear")


class RasterGenerator(Generator):
    """Shared raster layout; `prefix` is 1 (class) or 2 (class, M). `default_cache` is the cache `sample` decodes
    with (`decode` takes any of `CACHES`)."""

    merge_token: bool = False
    default_cache = "sliced"

    def __init__(self, gpt_cfg: GPTConfig, prefix_rope: str = "identity") -> None:
        super().__init__(gpt_cfg, prefix_rope)
        self.prefix = 2 if self.merge_token else 1
        rows, cols = grid_positions(gpt_cfg.max_len)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    # ---------------------------------------------------------------- layout
    def prefix_embeds(self, labels: Tensor, k: Tensor) -> Tensor:
        """(B, prefix, C): the class token, and for MergeAR the Merge Instruction token of K."""
        return self.gpt.embed_class(labels)[:, None]

    def _rope(self, n: int) -> tuple[Tensor, Tensor]:
        """cos, sin (prefix + n, D/2): `prefix_angles` for the prefix, raster positions 0..n-1 for the image tokens."""
        cos, sin = self.gpt.rope(self.rows[:n], self.cols[:n])
        one, zero = self.prefix_angles(self.prefix, cos.device)
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
    def sample(self, labels: Tensor, k: int, pick: Pick, guided: bool = False, *, steps: int | None = None,
               noise: SampleNoise | None = None, dtype: torch.dtype | None = None) -> Sampled:
        """Raster ids on `default_cache` -> merged tokens in order of first appearance with `assign` from the
        Position Cache (`group_by_id`); `steps` and `noise` do not apply to raster decoding (the picker draws)."""
        ids, stats = self.decode(labels, k, pick, guided, self.default_cache, dtype=dtype)
        merged, kk, assign = group_by_id(ids)
        return Sampled(merged, kk, assign, stats)

    def seq_len(self, k: int) -> int:
        return self.n_tokens

    @property
    def train_sequence_len(self) -> int:
        return self.prefix + self.n_tokens - 1

    def targets_count(self, batch: dict[str, Tensor]) -> int:
        return batch["assign"].numel()  # N per item


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
        self.pos = None
        if self.compress:
            from .mergear import PositionCache  # mergear.py builds on this module

            self.pos = PositionCache(B, N, p, self.window)
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
        one, zero = self.gen.prefix_angles(self.p, self.labels.device)
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
                "forward_passes": len(self.live),
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
    """LlamaGen: raster AR over the full N ids with a plain causal mask; it is not told K."""

    name = "llamagen"
    conditions_on_k = False
