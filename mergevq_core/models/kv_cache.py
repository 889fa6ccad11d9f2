"""The explicit KV cache of the GPT backbone: preallocated keys and values of every layer, written by slot.

One object serves every decoding layout: LlamaGen's plain cache (sliced to the live length, or a static
full-length buffer as a baseline), RandAR's parallel steps (`truncate` re-encodes the last step's tokens) and
MergeAR's compressed cache (`slot_write`: each sequence writes its own slot, chosen on the device, without a host
synchronisation; `compact` the live slots) and the static-shape step a compiled decoder runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KVCache", "SlotWrite"]


class SlotWrite:
    """One decode token per sequence, written at its own slot and read back under a mask: the sync-free step of
    MergeAR's cache and of a static-shape (compiled) decode step. slots (B,) long on the device; attention reads
    slots [0, keys) (a bound the caller knows on the host); mask (B, 1, 1, keys) bool (True = live) or None.
    It holds no state of its own, so a compiled step builds one per call."""

    __slots__ = ("k", "v", "rows", "slots", "keys", "mask")

    def __init__(self, k: Tensor, v: Tensor, rows: Tensor, slots: Tensor, keys: int, mask: Tensor | None) -> None:
        self.k, self.v, self.rows, self.slots, self.keys, self.mask = k, v, rows, slots, keys, mask

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        self.k[layer, self.rows, :, self.slots] = k[:, :, 0]
        self.v[layer, self.rows, :, self.slots] = v[:, :, 0]
        return self.k[layer, :, :, : self.keys], self.v[layer, :, :, : self.keys], self.mask


class KVCache:
    """Preallocated keys and values of every layer, (depth, B, H, T, D) each, with a validity mask (B, T).

    Keys are stored after RoPE, so a slot can hold any position and slot order does not matter. A step is
    `begin(n, slots)`, then every layer's attention calls `update`, then `end()`:

    - `begin(n)` writes the n new tokens of every sequence contiguously at slots [used, used + n);
    - `begin(1, slots)` writes one token per sequence at its own slot (B,), e.g. one freed by `free` (MergeAR);
    - `free(slots)` invalidates one slot per sequence (-1 = none); `truncate(n)` drops slots [n, used).

    Attention reads the first `used` slots (a cache sliced to the live length) or, with `static=True`, the whole
    buffer under a mask (LlamaGen's layout, kept as a benchmark baseline). While every slot below `used` is valid
    and a step has one token, no mask is built at all.
    """

    def __init__(self, depth: int, batch: int, heads: int, capacity: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, static: bool = False) -> None:
        self.k = torch.zeros(depth, batch, heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.static = static
        self.used = 0
        self._dense = True  # every slot in [0, used) is valid
        self._holes = False  # some slot below `used` was freed and not reused
        self._pending: tuple[int, int, Tensor | int | None, int] | None = None  # (start, n, slots, top)
        self.mask: Tensor | None = None
        self._rows = torch.arange(batch, device=device)  # row indices of a per-sequence slot write

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def live(self) -> Tensor:
        """Valid slots per sequence, (B,) long."""
        return self.valid.sum(1)

    def nbytes(self) -> int:
        """Bytes of the allocated key and value buffers."""
        return 2 * self.k.numel() * self.k.element_size()

    def begin(self, n: int, slots: Tensor | list[int] | None = None) -> None:
        """Reserve room for the next n tokens of every sequence (see the class docstring) and build the mask."""
        if self._pending is not None:
            raise RuntimeError("KVCache.begin called twice without end()")
        start = self.used
        if slots is None:
            end = start + n
            if end > self.capacity:
                raise ValueError(f"KV cache overflow: {end} slots needed, {self.capacity} allocated")
            self.valid[:, start:end] = True
            keys = self.capacity if self.static else end
            if self._dense and not self.static:
                self.mask = None  # plain causal: handled without a mask
            else:
                j = torch.arange(keys, device=self.valid.device)
                i = torch.arange(n, device=self.valid.device)
                mask = self.valid[:, None, :keys] & (j[None, None, :] <= start + i[None, :, None])  # (B, n, keys)
                self.mask = mask[:, None]  # (B, 1, n, keys)
            self._pending = (start, n, None, end)
            return
        listed = slots.tolist() if isinstance(slots, Tensor) else list(slots)  # one host sync per step
        if n != 1 or len(listed) != self.batch:
            raise ValueError(f"per-sequence slots need n = 1 and {self.batch} slots, got n={n}, {len(listed)}")
        top = max(listed) + 1
        if top > self.capacity or min(listed) < 0:
            raise ValueError(f"KV cache slots must lie in [0, {self.capacity}), got up to {top - 1}")
        same = listed[0] if all(x == listed[0] for x in listed) else None
        if same is None:
            slots = torch.as_tensor(listed, device=self.valid.device)
            self.valid[torch.arange(self.batch, device=self.valid.device), slots] = True
        elif self._holes or same >= self.used:  # below `used` and without holes, every slot is valid already
            self.valid[:, same:same + 1] = True
        keys = self.capacity if self.static else max(self.used, top)
        # a freed slot is reused by the next token, so the live slots are [0, keys) unless sequences differ
        if self.static:
            self._dense = False
        elif self.batch == 1 and not self._holes:
            self._dense = True
        else:
            self._dense = bool(self.valid[:, :keys].all())
        self.mask = None if self._dense else self.valid[:, None, None, :keys]
        self._pending = (self.used, 1, slots if same is None else same, top)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Write this step's k, v (B, H, n, D) of `layer`; return all keys and values attention reads, and the mask
        (None = causal over the new tokens; else bool (B, 1, n, keys), True = may attend)."""
        if self._pending is None:
            raise RuntimeError("KVCache.update called outside begin()/end()")
        start, n, slots, top = self._pending
        if slots is None:
            self.k[layer, :, :, start:start + n] = k
            self.v[layer, :, :, start:start + n] = v
        elif isinstance(slots, int):  # every sequence writes the same slot
            self.k[layer, :, :, slots:slots + 1] = k
            self.v[layer, :, :, slots:slots + 1] = v
        else:
            rows = torch.arange(self.batch, device=slots.device)
            self.k[layer, rows, :, slots] = k[:, :, 0]
            self.v[layer, rows, :, slots] = v[:, :, 0]
        keys = self.capacity if self.static else max(self.used, top)
        return self.k[layer, :, :, :keys], self.v[layer, :, :, :keys], self.mask

    def end(self) -> None:
        if self._pending is None:
            raise RuntimeError("KVCache.end called without begin()")
        self.used = max(self.used, self._pending[3])
        self._pending = None
        self.mask = None

    def slot_write(self, slots: Tensor, keys: int, mask: Tensor | None) -> SlotWrite:
        """A one-token step in which sequence b writes slot slots[b] (see `SlotWrite`); nothing is checked on the
        host, so the caller keeps slots in [0, capacity) and `keys` <= capacity. Pass it to `GPT.trunk` as the
        cache. `used` becomes at least `keys`; `valid` is not updated (the caller's mask says what is live)."""
        if self._pending is not None:
            raise RuntimeError("KVCache.slot_write during a step")
        if keys > self.capacity:
            raise ValueError(f"KV cache overflow: {keys} slots read, {self.capacity} allocated")
        self.used = max(self.used, keys)
        return SlotWrite(self.k, self.v, self._rows, slots, keys, mask)

    def free(self, slots: Tensor) -> None:
        """Invalidate slots[b] (or every slots[b, j]) of sequence b; -1 entries are ignored."""
        hit = slots >= 0
        if bool(hit.any()):
            rows = torch.arange(self.batch, device=slots.device).view(-1, *([1] * (slots.dim() - 1))).expand_as(slots)
            self.valid[rows[hit], slots[hit]] = False
            self._dense = False
            self._holes = True

    def truncate(self, n: int) -> None:
        """Drop slots [n, used) of every sequence (RandAR re-encodes them in the next step)."""
        if not 0 <= n <= self.used:
            raise ValueError(f"truncate to {n}: the cache holds {self.used} slots")
        self.valid[:, n:] = False
        self.used = n

    def resize(self, capacity: int) -> None:
        """Reallocate to `capacity` slots (at least `used`), keeping the contents of slots [0, used)."""
        if self._pending is not None:
            raise RuntimeError("KVCache.resize during a step")
        if capacity < self.used:
            raise ValueError(f"cannot resize to {capacity} slots: {self.used} are in use")
        if capacity == self.capacity:
            return
        depth, b, h, _, d = self.k.shape
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(depth, b, h, capacity, d, device=old.device, dtype=old.dtype)
            new[:, :, :, : self.used] = old[:, :, :, : self.used]
            setattr(self, name, new)
        valid = torch.zeros(b, capacity, dtype=torch.bool, device=self.valid.device)
        valid[:, : self.used] = self.valid[:, : self.used]
        self.valid = valid

    def compact(self, valid: Tensor | None = None) -> Tensor:
        """Move every sequence's valid slots (`valid` (B, used), default the cache's own mask) to the front, in
        order; returns the new index of each old slot (B, used), -1 for the invalid ones. Attention does not depend
        on slot order (keys carry their RoPE)."""
        if self._pending is not None:
            raise RuntimeError("KVCache.compact during a step")
        valid = self.valid[:, : self.used] if valid is None else valid
        new_index = torch.where(valid, valid.long().cumsum(1) - 1, torch.full_like(valid, -1, dtype=torch.long))
        live = valid.sum(1)
        top = int(live.max()) if live.numel() else 0
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :top]  # valid slots first
        depth, _, h, _, d = self.k.shape
        idx = order[None, :, None, :, None].expand(depth, -1, h, -1, d)
        for buf in (self.k, self.v):
            buf[:, :, :, :top] = buf[:, :, :, : self.used].gather(3, idx)
        self.valid.zero_()
        self.valid[:, :top] = torch.arange(top, device=live.device)[None] < live[:, None]
        self.used = top
        self._dense = bool((live == top).all())
        self._holes = not self._dense
        return new_index

    def reset(self) -> None:
        self.valid.zero_()
        self.used, self._dense, self._holes, self._pending, self.mask = 0, True, False, None, None
