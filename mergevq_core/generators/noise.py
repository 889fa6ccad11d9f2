"""Per-sample sampling noise from a counter-based hash: each value depends on (seed, sample index, stream, step,
element) only, never on which other samples share the batch, how large the batch is or how many processes made it.

`SampleNoise(seed, index)` holds the global sample index of each row (an int64 tensor on the decoding device).
`uniform(stream, step, shape)` hashes every (seed, index[b], stream, step, element) with splitmix64's mixer in
torch int64 ops on that device, in one batched computation: no loop over rows or elements, no host generator, no
device-to-host sync. Streams name a use (`ORDER_STREAM` for RandAR's decoding order, `sub_token_stream(i)` for
sub-token i of a target's id) and `step` is the target position, so each draw of a sample has its own counter.

Two's-complement int64 multiplication wraps, which is what the mixer needs; `>>` is arithmetic on negative values,
so every right shift is masked to a logical one. A value's top 23 bits become u = (h23 + 0.5) / 2^23, exactly
representable in float32 and so strictly inside (0, 1) (24 bits would round the top value up to 1.0 in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ORDER_STREAM", "SampleNoise", "mix64", "sub_token_stream", "to_unit"]

ORDER_STREAM = 0  # RandAR's random slot order


def sub_token_stream(i: int) -> int:
    """The stream of sub-token i's draws."""
    return 1 + i


_MASK64 = (1 << 64) - 1
_BITS = 23  # float32 holds (2·h + 1) / 2^24 exactly for h < 2^23


def _signed(v: int) -> int:
    """A 64-bit pattern as the int64 value torch stores for it."""
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
# one odd multiplier per key field, so that swapping two fields' values changes the hash
_SEED_K, _INDEX_K, _STREAM_K, _STEP_K, _ELEM_K = (
    _signed(0xD1B54A32D192ED03), _signed(0xABA0C8F3E5B1C46D), _signed(0x8CB92BA72F3D8DD7),
    _signed(0xDB4F0B9175AE2165), _signed(0xC2B2AE3D27D4EB4F),
)


def _srl(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (a bijection of 64-bit patterns with full avalanche)."""
    x = (x ^ _srl(x, 30)) * _M1
    x = (x ^ _srl(x, 27)) * _M2
    return x ^ _srl(x, 31)


def to_unit(bits: Tensor) -> Tensor:
    """int64 hashes -> float32 (h23 + 0.5) / 2^23 of their top 23 bits: in [2^-24, 1 - 2^-24], never 0 or 1."""
    top = _srl(bits, 64 - _BITS)
    return (top * 2 + 1).to(torch.float32) * (0.5 ** (_BITS + 1))


def _mix_in(h: Tensor, value: int | Tensor, mult: int) -> Tensor:
    """Absorb one key field: h ← mix64(h + value·mult + golden)."""
    if isinstance(value, Tensor):
        return mix64(h + value.to(torch.int64) * mult + _GOLDEN)
    return mix64(h + _signed(value * mult + _GOLDEN))


@dataclass(frozen=True, eq=False)
class SampleNoise:
    """Noise for a batch whose row b is global sample `index[b]` (B,) int64, under `seed`. Rows may come in any
    order and any company: row b's values depend on (seed, index[b]) only. `select(rows)` keeps some rows (e.g. the
    unfinished samples of a resumed job)."""

    seed: int
    index: Tensor

    def __post_init__(self) -> None:
        if self.index.dim() != 1:
            raise ValueError(f"index must be (B,), got shape {tuple(self.index.shape)}")
        if self.index.dtype != torch.int64:
            object.__setattr__(self, "index", self.index.to(torch.int64))
        # the seed's term as a tensor, so that a compiled step does not specialise on the seed
        object.__setattr__(self, "_seed_term", torch.tensor(_signed(self.seed * _SEED_K), device=self.index.device))
        object.__setattr__(self, "_elements", {})  # n -> arange(n)·key, made once (eagerly, by the first draw)

    @classmethod
    def arange(cls, seed: int, batch: int, start: int = 0, device: torch.device | str | None = None) -> "SampleNoise":
        """Samples start .. start + batch - 1."""
        return cls(seed, torch.arange(start, start + batch, device=device, dtype=torch.int64))

    def __len__(self) -> int:
        return self.index.shape[0]

    @property
    def device(self) -> torch.device:
        return self.index.device

    def select(self, rows: Tensor | slice) -> "SampleNoise":
        return SampleNoise(self.seed, self.index[rows])

    __getitem__ = select

    def bits(self, stream: int, step: int | Tensor, shape: tuple[int, ...] = ()) -> Tensor:
        """(B, *shape) int64 hashes of (seed, index, stream, step, element), element = the flat position in shape.
        `step` may be a 0-d / (B,) tensor (a compiled step need not specialise on it)."""
        h = mix64(self.index * _INDEX_K + self._seed_term)
        h = _mix_in(h, stream, _STREAM_K)
        h = _mix_in(h, step, _STEP_K)
        n = 1
        for s in shape:
            n *= s
        elem = self._elements.get(n)
        if elem is None:
            # a tensor, not an index expression inside a compiled step: inductor's C++ index arithmetic does not
            # wrap like int64 tensors do (it changed ~1 in 5 hashes when this product was traced)
            elem = self._elements[n] = torch.arange(n, device=self.device, dtype=torch.int64) * _ELEM_K
        return mix64(h[:, None] + elem[None]).reshape(len(self), *shape)

    def uniform(self, stream: int, step: int | Tensor, shape: tuple[int, ...] = ()) -> Tensor:
        """(B, *shape) float32 uniform in the open interval (0, 1): (h23 + 0.5) / 2^23 of the top 23 hash bits."""
        return to_unit(self.bits(stream, step, shape))

    def gumbel(self, stream: int, step: int | Tensor, shape: tuple[int, ...] = ()) -> Tensor:
        """(B, *shape) float32 standard Gumbel noise -log(-log(u)); argmax(logits + gumbel) is an exact draw from
        softmax(logits)."""
        return -torch.log(-torch.log(self.uniform(stream, step, shape)))
