"""`mergevq benchmark lfq`: time and memory of LFQ's exact codebook entropy (forward + backward) at the paper's
2^18 codebook, per accumulation chunk, against a time budget. The entropy sums over every code of the codebook in
chunks of `chunk` codes (`quant.entropy.codebook_entropy`): the chunk trades peak memory against kernel count."""

from __future__ import annotations

from typing import Any

import torch

from ..quant.entropy import codebook_entropy
from .timing import environment, quantiles, timed

__all__ = ["bench_entropy"]


def bench_entropy(*, dim: int = 18, batch: int = 2, tokens: int = 256, chunks: tuple[int, ...] = (128, 4096),
                  temperature: float = 0.01, runs: int = 10, warmups: int = 1, budget_s: float = 30.0,
                  device: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per chunk size: median / p10 / p90 seconds of one forward + backward of the codebook entropy of
    (batch, tokens, dim) codes, the raw run times, peak CUDA memory (GPU), and whether the median is within
    `budget_s`."""
    from ..dist import pick_device

    dev = pick_device(device)
    if runs < 1 or warmups < 0:
        raise ValueError("--runs must be >= 1 and --warmups >= 0")
    g = torch.Generator().manual_seed(0)
    z0 = (torch.randn(batch, tokens, dim, generator=g) * 0.01).to(dev)
    rows = []
    for chunk in chunks:
        def once() -> None:
            z = z0.clone().requires_grad_()
            torch.autograd.grad(codebook_entropy(z, temperature, chunk=chunk), z)

        for _ in range(warmups):
            once()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times = [timed(once, dev) for _ in range(runs)]
        q = quantiles(times)
        rows.append({"chunk": chunk, "dim": dim, "codes": 2**dim, "batch": batch, "tokens": tokens,
                     "median_s": q["median"], "p10_s": q["p10"], "p90_s": q["p90"], "runs_s": times,
                     "peak_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
                     "budget_s": budget_s, "within_budget": q["median"] <= budget_s})
    return rows, environment(dev)
