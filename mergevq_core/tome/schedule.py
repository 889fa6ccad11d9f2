"""Per-layer merge counts and the random keep-count sampler.

A layer that sees ``T_l`` image tokens plus a protected cls token (1 + T_l
tokens, cls at even position 0) has ``T_l // 2`` mergeable A tokens, so it can
remove at most ``T_l // 2`` tokens.
"""
from __future__ import annotations

import math

import torch


def is_perfect_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


def layer_cap(t: int) -> int:
    """Max merges for a layer with ``t`` image tokens (+ protected cls)."""
    return t // 2


def max_total_merges(t: int, depth: int) -> int:
    """Most tokens removable from ``t`` image tokens in ``depth`` layers (greedy is optimal)."""
    remaining = t
    for _ in range(depth):
        remaining -= layer_cap(remaining)
    return t - remaining


def _linear_raw(r: int, depth: int) -> list[int]:
    lo = int(1.5 * r)
    hi = 2 * r - lo
    step = (hi - lo) / (depth - 1) if depth > 1 else 0.0
    return [int(lo + step * layer) for layer in range(depth)]


def _linear_desired(total: int, depth: int) -> list[int]:
    best_r, best_err = 0, None
    for r in range(total + 1):
        err = abs(sum(_linear_raw(r, depth)) - total)
        if best_err is None or err < best_err:
            best_r, best_err = r, err
    raw = _linear_raw(best_r, depth)
    raw[0] += total - sum(raw)
    return raw


def _square_desired(total: int, depth: int) -> list[int]:
    weights = [(depth - layer) ** 2 for layer in range(depth)]
    norm = sum(weights)
    raw = [total * w // norm for w in weights]
    for layer in range(total - sum(raw)):
        raw[layer % depth] += 1
    return raw


def _fit_to_caps(desired: list[int], n_tokens: int, total: int) -> list[int]:
    """Clamp each layer to what it can do while keeping the rest reachable.

    Walks the layers in order carrying the difference (positive: excess pushed
    to later layers; negative: merges pulled forward to keep the rest feasible).
    The result sums to ``total`` whenever the caller checked reachability.
    """
    depth = len(desired)
    out: list[int] = []
    t, left, carry = n_tokens, total, 0
    for layer, want in enumerate(desired):
        cap = min(layer_cap(t), left)
        later = depth - layer - 1
        lower = 0
        while lower < cap and left - lower > max_total_merges(t - lower, later):
            lower += 1
        r = min(max(want + carry, lower), cap)
        carry += want - r
        out.append(r)
        t -= r
        left -= r
    return out


def merge_schedule(n_tokens: int, keep: int, depth: int, kind: str = "linear") -> list[int]:
    """Merges per layer removing exactly ``n_tokens - keep`` image tokens.

    ``linear`` follows the public MergeVQ release (base r with a 1.5r -> 0.5r
    ramp, remainder on layer 0); ``square`` uses weights (depth - l)^2 (the
    paper's "square decreasing"). Both are then fitted to per-layer caps.
    """
    if kind not in ("linear", "square"):
        raise ValueError(f"unknown schedule kind {kind!r}")
    if depth < 0 or n_tokens < 0:
        raise ValueError("depth and n_tokens must be non-negative")
    total = n_tokens - keep
    if keep < 0 or total < 0 or total > max_total_merges(n_tokens, depth):
        raise ValueError(f"keep={keep} unreachable from {n_tokens} tokens in {depth} layers")
    if total == 0:
        return [0] * depth
    desired = _linear_desired(total, depth) if kind == "linear" else _square_desired(total, depth)
    out = _fit_to_caps(desired, n_tokens, total)
    assert sum(out) == total
    return out


def keep_candidates(
    keep: int, n_tokens: int, dist: str = "gaussian", num: int = 6, min_keep: int = 1
) -> tuple[list[int], list[float]]:
    """Perfect-square keep counts around ``keep`` and their probabilities.

    gaussian:    keep_i = (sqrt(keep) + i - 1)^2, w_i = exp(-(i-1)^2 / (2 * 0.5^2)) + 0.05
    exponential: keep_i = (sqrt(keep) + i)^2,     w_i = 2 exp(-2 i) + 0.1
    fixed:       [keep] with probability 1.
    Candidates outside [max(1, min_keep), n_tokens] (what the encoder can reach) are dropped and the rest
    renormalised.
    """
    if not is_perfect_square(keep):
        raise ValueError(f"keep must be a perfect square, got {keep}")
    root = math.isqrt(keep)
    if dist == "fixed":
        pairs = [(keep, 1.0)]
    elif dist == "gaussian":
        pairs = [((root + i - 1) ** 2, math.exp(-((i - 1) ** 2) / (2 * 0.5**2)) + 0.05) for i in range(num)]
    elif dist == "exponential":
        pairs = [((root + i) ** 2, 2 * math.exp(-2 * i) + 0.1) for i in range(num)]
    else:
        raise ValueError(f"unknown keep distribution {dist!r}")
    lo = max(1, min_keep)
    pairs = [(k, w) for k, w in pairs if lo <= k <= n_tokens]
    if not pairs:
        raise ValueError(f"no keep candidate within [{lo}, {n_tokens}] for keep={keep}")
    norm = sum(w for _, w in pairs)
    return [k for k, _ in pairs], [w / norm for _, w in pairs]


class KeepSampler:
    """Draws a keep count per step from :func:`keep_candidates`."""

    def __init__(self, keep: int, n_tokens: int, dist: str = "gaussian", num: int = 6, min_keep: int = 1) -> None:
        self.keep = keep
        self.n_tokens = n_tokens
        self.candidates, self.probs = keep_candidates(keep, n_tokens, dist, num, min_keep)

    def sample(self, generator: torch.Generator) -> int:
        idx = torch.multinomial(torch.tensor(self.probs), 1, generator=generator)
        return self.candidates[int(idx)]

    def schedule_for(self, keep: int, depth: int, kind: str = "linear") -> list[int]:
        return merge_schedule(self.n_tokens, keep, depth, kind)
