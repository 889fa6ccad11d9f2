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

__all__ = ["CACHES", "LlamaGen", "RasterDecoder", "RasterGenerator", "compile_step", "group_by_id"]

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
               window: int | None = None, dtype: torch.dtype | None = None,
               compiled: bool = False) -> tuple[Tensor, dict[str, Any]]:
        """Generate the N raster ids of each label (B,). `pick(t, i, logits)` chooses sub-token i of target t for
        every row (2B rows with CFG: conditional first, then the null class). Returns ids (B, N) and statistics:
        live KV slots per step and image (`live_history` (N, B)), their peak, the slots allocated (high-water mark)
        and the number of distinct ids. `window` (cache="mergear") defaults to the model's. `compiled`: each step
        through `torch.compile` (see `RasterDecoder`)."""
        dec = self._decoder(labels, k, pick, guided, cache, window, dtype, compiled, None)
        if dec.overflowed:  # more distinct ids than the capacity allowed for: again with a full-length cache
            dec = self._decoder(labels, k, pick, guided, cache, window, dtype, compiled, self.prefix + self.n_tokens - 1)
        return dec.ids, dec.stats()

    def _decoder(self, labels, k, pick, guided, cache, window, dtype, compiled, capacity) -> "RasterDecoder":
        dec = RasterDecoder(self, labels, k, guided, cache, window, dtype, capacity, compiled)
        dec.prefill(pick)
        for t in range(self.n_tokens - 1):
            dec.step(t, pick)
        return dec

    @torch.no_grad()
    def sample(self, labels: Tensor, k: int, pick: Pick, guided: bool = False, *, steps: int | None = None,
               noise: SampleNoise | None = None, dtype: torch.dtype | None = None, compiled: bool = False) -> Sampled:
        """Raster ids on `default_cache` -> merged tokens in order of first appearance with `assign` from the
        Position Cache (`group_by_id`); `steps` and `noise` do not apply to raster decoding (the picker draws)."""
        ids, stats = self.decode(labels, k, pick, guided, self.default_cache, dtype=dtype, compiled=compiled)
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
    (a benchmark's way to reach position T quickly; then only Eq. 12's window and representatives stay).

    No step reads a tensor on the host: the Position Cache lives on the device, attention reads a host-known bound
    of slots under a mask, and the live-slot history stays on the device until `stats()`. With `compiled=True`
    (after `prefill`) every step runs one static-shape function (fixed cache capacity, a mask instead of slicing, t
    as a tensor) through `torch.compile(fullgraph=True)`; `compile_options` go to `torch.compile`."""

    def __init__(self, gen: "RasterGenerator", labels: Tensor, k: Tensor | int, guided: bool = False,
                 cache: str = "sliced", window: int | None = None, dtype: torch.dtype | None = None,
                 capacity: int | None = None, compiled: bool = False, compile_options: dict[str, Any] | None = None) -> None:
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}")
        if compiled and cache == "static":
            raise ValueError("cache='static' is the eager baseline; a compiled step already reads a static buffer")
        self.gen, self.guided, self.cache_kind = gen, guided, cache
        B, N, p, dev = labels.shape[0], gen.n_tokens, gen.prefix, labels.device
        self.B, self.N, self.p = B, N, p
        k = torch.as_tensor(k, device=dev).expand(B)
        self.labels = torch.cat([labels, torch.full_like(labels, gen.gpt.null_class)]) if guided else labels
        self.k = torch.cat([k, k]) if guided else k
        self.window = window if window is not None else getattr(gen, "window", N)
        self.compress = cache == "mergear"
        full = p + N - 1
        if capacity is None:  # MergeAR: prefix + window + K representatives and a margin; more means a redo
            capacity = min(full, p + self.window + int(k.max()) + max(8, int(k.max()) // 8)) if self.compress else full
        self.kv = gen.gpt.new_cache(self.labels.shape[0], capacity, dtype=dtype, static=cache == "static")
        self.pos = None
        if self.compress:
            from .mergear import PositionCache  # mergear.py builds on this module

            self.pos = PositionCache(B, N, p, self.window, capacity, dev)
        self.ids = torch.full((B, N), -1, dtype=torch.long, device=dev)
        cos, sin = gen.gpt.rope(gen.rows[:N], gen.cols[:N])  # (N, D/2): every step's rotation, computed once
        self.cos, self.sin = cos.to(dev), sin.to(dev)
        self.live: list[Tensor | int] = []  # per forward pass: live slots per image (a tensor) or for all (an int)
        self.compiled = compiled
        self._compile_options = compile_options or {}
        self._step_fn: Any = None
        self._t = torch.arange(N, device=dev)  # the compiled step's t, as (1,) views (no host-to-device copy)

    def _rows(self, x: Tensor) -> Tensor:
        return x.repeat(2, *([1] * (x.dim() - 1))) if self.guided else x

    def _forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: Any) -> Tensor:
        """Hidden state of the last input token of every row."""
        return self.gen.gpt.trunk(x.to(self.kv.k.dtype), cos, sin, cache=cache)[:, -1]

    def _emit(self, t_next: int | Tensor, h: Tensor, pick: Pick) -> None:
        """Sample x_{t_next} from h and record it (Position Cache first: it compares with the earlier ids)."""
        new = self.gen.gpt.sample_ids(h, lambda i, lg: pick(t_next, i, lg))[: self.B]
        if self.pos is not None:
            self.pos.record(t_next, new, self.ids)
        if isinstance(t_next, int):
            self.ids[:, t_next] = new
        else:
            self.ids.index_copy_(1, t_next, new[:, None])

    def _contiguous(self, x: Tensor, cos: Tensor, sin: Tensor, t_next: int, pick: Pick) -> None:
        """Every row writes the same next slots ([used, used + n)): prefill, plain caches, MergeAR before t = w."""
        kv = self.kv
        kv.begin(x.shape[1])
        h = self._forward(x, cos, sin, kv)
        kv.end()
        self.live.append(kv.used)
        self._emit(t_next, h, pick)

    def prefill(self, pick: Pick) -> None:
        one, zero = self.gen.prefix_angles(self.p, self.labels.device)
        self._contiguous(self.gen.prefix_embeds(self.labels, self.k), one, zero, 0, pick)

    def step(self, t: int, pick: Pick) -> None:
        if self.compiled:
            return self._compiled_step(t, pick)
        x = self.gen.gpt.embed_ids(self._rows(self.ids[:, t])[:, None])
        cos, sin = self.cos[t:t + 1], self.sin[t:t + 1]
        slot = self.pos.slot_for(t) if self.pos is not None else None
        if slot is None or isinstance(slot, int):
            return self._contiguous(x, cos, sin, t + 1, pick)
        keys = self.pos.top
        mask = self._rows(self.pos.live_mask(keys))[:, None, None]
        h = self._forward(x, cos, sin, self.kv.slot_write(self._rows(slot), keys, mask))
        self.live.append(self.pos.n_alloc.clone())
        self._emit(t + 1, h, pick)

    # ---------------------------------------------------------------- the static-shape step
    def _static_step(self, t: Tensor, pick: Pick) -> Tensor:
        """Feed x_t and sample x_{t+1} with t a (1,) tensor: slots and mask from tensors only, attention over the
        whole buffer. Returns the live slots per image after the step."""
        C = self.kv.capacity
        x = self.gen.gpt.embed_ids(self._rows(self.ids.index_select(1, t)))
        cos, sin = self.cos.index_select(0, t), self.sin.index_select(0, t)
        if self.pos is not None:
            slot = self.pos.slot_for(t)
            live = self.pos.n_alloc
            mask = self.pos.live_mask(C)
        else:
            slot = (self.p + t).expand(self.B)
            live = slot + 1
            mask = (torch.arange(C, device=t.device) <= self.p + t).expand(self.B, C)
        h = self._forward(x, cos, sin, self.kv.slot_write(self._rows(slot), C, self._rows(mask)[:, None, None]))
        self._emit(t + 1, h, pick)
        return live.clone()

    def _compiled_step(self, t: int, pick: Pick) -> None:
        if self._step_fn is None:
            if self.pos is not None:
                self.pos.top = self.pos.capacity  # constants from here on: the step reads the whole buffer
            self.kv.used = self.kv.capacity
            self._step_fn = compile_step(self._static_step, self._compile_options)
        self.live.append(self._step_fn(self._t[t:t + 1], pick))

    # ---------------------------------------------------------------- benchmarks
    def fast_forward(self, tokens: Tensor, pick: Pick) -> None:
        """After `prefill`: feed x_0..x_{T-1} = tokens (B, T) in one pass and sample x_T. With the compressed cache
        the duplicates that already left the window are then freed and the live slots compacted, which is the
        cache state (up to slot order) of step-by-step decoding; keys are computed under the causal mask, so
        values differ from it, but sizes and costs are the same. (Set-up, not decoding: it may read tensors.)"""
        T = tokens.shape[1]
        if T < 1 or T >= self.N:
            raise ValueError(f"fast_forward needs 1 <= T < N={self.N}, got {T}")
        self.ids[:, :T] = tokens
        pos, kv, p = self.pos, self.kv, self.p
        if kv.capacity < p + T:
            kv.resize(p + T)
        if pos is not None:  # x_0 was recorded by prefill; x_1..x_{T-1} now, in their contiguous slots
            pos.rep[:, :T] = first_occurrence(tokens)
            pos.slot_of[:, :T] = torch.arange(p, p + T, device=tokens.device)
        self._contiguous(self.gen.gpt.embed_ids(self._rows(tokens)), self.cos[:T], self.sin[:T], T, pick)
        if pos is None:
            return
        last = T - 1 - self.window  # positions <= last have left the window of query T - 1
        keep = torch.ones(self.B, p + T, dtype=torch.bool, device=tokens.device)
        if last >= 0:
            keep[:, p:p + last + 1] = pos.rep[:, : last + 1]
        new_index = kv.compact(self._rows(keep))[: self.B]
        pos.slot_of[:, :T] = torch.where(keep[:, p:], new_index.gather(1, pos.slot_of[:, :T]), -1)
        pos.n_alloc = keep.sum(1)
        pos.top = int(pos.n_alloc.max())
        kv.resize(max(kv.used, pos.capacity))  # the capacity decode() gives K: the same shapes as a full decode
        pos.capacity = kv.capacity
        self.live[-1] = pos.n_alloc.clone()

    @property
    def overflowed(self) -> bool:
        """Whether a MergeAR slot ran past the capacity (then the ids are not to be used; decode again)."""
        return self.pos is not None and bool(self.pos.overflow)

    def stats(self) -> dict[str, Any]:
        """Decoding statistics (this reads the device once, after the loop)."""
        ref = self.ids
        history = torch.stack([x if isinstance(x, Tensor) else torch.full((self.B,), x, device=ref.device)
                               for x in self.live])  # (passes, B): slots attended at each pass, its token included
        return {"peak_live_slots": int(history.max()), "live_history": history,
                "allocated_slots": int(history.max()) if self.compress else self.kv.used,
                "forward_passes": len(self.live),
                "capacity": self.kv.capacity, "prefix": self.p, "window": self.window if self.compress else None,
                "distinct_ids": first_occurrence(self.ids).sum(1).tolist(),
                "kv_bytes_per_slot": self.kv.nbytes() // max(1, self.kv.capacity)}


def compile_step(fn: Any, options: dict[str, Any] | None = None) -> Any:
    """`torch.compile(fn, fullgraph=True, dynamic=False)`: one graph per shape (batch, cache capacity), each reused
    by every later batch of that shape, so the recompile limit is raised to hold a benchmark's many shapes. On CUDA
    the default mode is `reduce-overhead` (CUDA graphs)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    opts = dict(options or {})
    if "mode" not in opts and "backend" not in opts and torch.cuda.is_available():
        opts["mode"] = "reduce-overhead"
    return torch.compile(fn, fullgraph=True, dynamic=False, **opts)


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
