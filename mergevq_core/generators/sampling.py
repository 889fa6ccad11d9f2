"""Sampling from logits: temperature, top-k, top-p, classifier-free guidance, and RandAR's decoding schedule.

`SamplingSettings.picker(total, noise)` returns the `pick(t, i, logits, decoded=None)` callback that the
generators' decoders call for target position t and sub-token i; `decoded` is the number of image tokens decoded
before the forward pass that gave these logits (None: t, one token per pass), which the linear guidance schedule
counts. It draws by Gumbel-max with per-sample noise (`noise.SampleNoise`):
argmax(filtered logits / temperature + Gumbel(seed, sample index, stream 1 + i, step t)), an exact draw from the
filtered softmax whose randomness depends on the sample's index only, so a sample is the same at any batch size
and on any number of processes, and the draw is one batched device operation. With CFG the batch holds 2B rows,
the B conditional ones first, and the noise covers those B. `sample_from` still draws from a `torch.Generator`
for callers that want one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .noise import SampleNoise, sub_token_stream

__all__ = [
    "Pick", "SamplingSettings", "cfg_scale_at", "draw_from", "filter_logits", "guide", "randar_schedule", "sample_from",
]

class Pick(Protocol):
    """(target position t, sub-token i, logits (R, V), decoded: tokens decoded before this pass) -> ids (R,)."""

    def __call__(self, t: int, i: int, logits: Tensor, /, decoded: int | None = None) -> Tensor: ...



def _per_sub(value: float | tuple[float, ...], i: int) -> float:
    if isinstance(value, tuple):
        return value[min(i, len(value) - 1)]
    return value


@dataclass(frozen=True)
class SamplingSettings:
    """cfg: guidance scale s (1 = none), one value or one per sub-token; cfg_schedule: `constant`, or `linear`
    (RandAR's: 1 + (s − 1)·decoded/N, from 1 at the first pass; see `cfg_scale_at`). The CLI's default is the
    generator's `default_cfg_schedule` (linear for randar, as the paper). temperature, top_k (0 = off), top_p
    (1 = off) likewise per sub-token."""

    cfg: float | tuple[float, ...] = 1.0
    cfg_schedule: str = "constant"
    temperature: float | tuple[float, ...] = 1.0
    top_k: int | tuple[int, ...] = 0
    top_p: float | tuple[float, ...] = 1.0

    def __post_init__(self) -> None:
        if self.cfg_schedule not in ("constant", "linear"):
            raise ValueError(f"cfg_schedule must be constant or linear, got {self.cfg_schedule!r}")
        for name in ("cfg", "temperature", "top_k", "top_p"):
            v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        temps = self.temperature if isinstance(self.temperature, tuple) else (self.temperature,)
        if any(t < 0 for t in temps):
            raise ValueError("temperature must be >= 0")
        ps = self.top_p if isinstance(self.top_p, tuple) else (self.top_p,)
        if any(not 0 < p <= 1 for p in ps):
            raise ValueError("top_p must be in (0, 1]")

    @property
    def guided(self) -> bool:
        scales = self.cfg if isinstance(self.cfg, tuple) else (self.cfg,)
        return any(s != 1.0 for s in scales)

    def picker(self, total: int, noise: SampleNoise) -> Pick:
        """pick(t, i, logits, decoded=None): guide (if CFG) at the scale for `decoded` tokens decoded of `total`
        (None: t), filter and draw with `noise` (one row per sample: the B conditional rows under CFG) at stream
        `sub_token_stream(i)`, step t; returns ids for every row (both CFG halves)."""
        guided = self.guided

        def pick(t: int, i: int, logits: Tensor, /, decoded: int | None = None) -> Tensor:
            if guided:
                done = t if decoded is None else decoded
                scale = cfg_scale_at(_per_sub(self.cfg, i), self.cfg_schedule, done, total)
                logits = guide(logits, scale)
            ids = draw_from(logits, noise, sub_token_stream(i), t, _per_sub(self.temperature, i),
                            int(_per_sub(self.top_k, i)), _per_sub(self.top_p, i))
            return torch.cat([ids, ids]) if guided else ids

        return pick


def cfg_scale_at(scale: float, schedule: str, decoded: int, total: int) -> float:
    """Guidance for logits computed after `decoded` of `total` tokens were decoded: constant s, or RandAR's linear
    s(decoded) = 1 + (s − 1)·decoded/N (its "1.0,s" default: unguided at the first pass, just under s at the last;
    the tokens of one parallel step share a scale)."""
    if schedule == "constant" or total < 1:
        return scale
    return 1.0 + (scale - 1.0) * decoded / total


def guide(logits: Tensor, scale: float) -> Tensor:
    """(2B, V) rows [cond; uncond] -> (B, V): l_u + s·(l_c − l_u), before any filtering."""
    cond, uncond = logits.float().chunk(2)
    return uncond + scale * (cond - uncond)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Keep the top_k largest logits (0 = all), then the smallest set whose probability reaches top_p (the token
    that crosses p is kept); the rest become -inf. logits (R, V)."""
    logits = logits.float()
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_l, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_l.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, idx, drop), -math.inf)
    return logits


def _tempered(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """Logits divided by the temperature (none at 0, which is greedy), then top-k / top-p filtered."""
    return filter_logits(logits / max(temperature, 1e-5) if temperature else logits, top_k, top_p)


def draw_from(logits: Tensor, noise: SampleNoise, stream: int, step: int | Tensor, temperature: float = 1.0,
              top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """One id per row of logits (B, V), row b drawn with noise row b: argmax(filtered + Gumbel), i.e. exactly
    categorical from the filtered softmax; temperature 0 is greedy (no noise)."""
    filtered = _tempered(logits, temperature, top_k, top_p)
    if temperature == 0:
        return filtered.argmax(-1)
    if len(noise) != filtered.shape[0]:
        raise ValueError(f"noise has {len(noise)} rows for {filtered.shape[0]} rows of logits")
    g = noise.gumbel(stream, step, (filtered.shape[-1],)).to(filtered.device)
    return (filtered + g).argmax(-1)


def sample_from(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """One id per row of logits (R, V) drawn from a torch.Generator; temperature 0 is greedy."""
    if temperature == 0:
        return _tempered(logits, 0, top_k, top_p).argmax(-1)
    probs = _tempered(logits, temperature, top_k, top_p).softmax(-1)
    if generator is not None and generator.device != probs.device:
        # draw on the generator's device so the same seed gives the same ids on CPU and GPU
        return torch.multinomial(probs.to(generator.device), 1, generator=generator)[:, 0].to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def randar_schedule(n: int, steps: int) -> list[int]:
    """Tokens decoded at each of `steps` parallel steps (RandAR's cosine schedule): after step s, the total is
    min(n, ⌊(1 − cos(π/2·s/T))·n⌋ + 1). Every step decodes at least one token; the counts sum to n."""
    if n < 1 or steps < 1:
        raise ValueError(f"need n >= 1 and steps >= 1, got {n}, {steps}")
    steps = min(steps, n)
    counts, done = [], 0
    for s in range(1, steps + 1):
        target = n if s == steps else min(n, math.floor((1 - math.cos(math.pi / 2 * s / steps)) * n) + 1)
        target = max(target, done + 1)
        target = min(target, n - (steps - s))  # leave at least one token for each remaining step
        counts.append(target - done)
        done = target
    return counts
