"""Inception statistics accumulated batch by batch, and reduced across torchrun ranks.

FID needs only the mean and covariance of the 2048-d pool features, so a pass keeps running sums in float64:
n, Σx (F,) and Σxxᵀ (F, F); mu = Σx / n and sigma = (Σxxᵀ − n·mu·muᵀ) / (n − 1) (np.cov's unbiased estimate).
Precision / recall and the Inception Score need per-sample values: the pool features (float32, (M, F), 400 MB
for 50k) and the classifier logits (float32, (M, 1008), 200 MB) are kept on the CPU when asked for.

Under torchrun each rank reads the contiguous rows `part_range(count, rank, world)`; the sums are all-reduced
and the kept rows all-gathered in rank order, i.e. in the source's order, so every rank ends with what one
process would have computed (up to float64 summation order).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..dist import DistInfo
from ..progress import SILENT, Progress
from .image_sources import ImageSource

__all__ = ["FEATURE_DIM", "FeatureStats", "StatsAccumulator", "extractor", "feature_stats", "merge_stats",
           "part_range", "reduce_stats"]

FEATURE_DIM = 2048  # Inception-v3 pool3
POOL, LOGITS = "2048", "logits_unbiased"  # torch-fidelity's feature names


@dataclass
class FeatureStats:
    """Running sums of F-d features over `count` images; `features` (M, F) / `logits` (M, 1008) when kept.

    Shapes: total (F,) float64, outer (F, F) float64 (Σxxᵀ), features (M, F) float32, logits (M, 1008) float32."""

    count: int
    total: Tensor
    outer: Tensor
    features: Tensor | None = None
    logits: Tensor | None = None

    @property
    def mu(self) -> np.ndarray:
        return (self.total / self.count).numpy()

    @property
    def sigma(self) -> np.ndarray:
        n, mu = self.count, self.total / self.count
        return ((self.outer - n * torch.outer(mu, mu)) / (n - 1)).numpy()

    def stats(self) -> dict[str, np.ndarray]:
        """{"mu": (F,), "sigma": (F, F)}, what `fid_from_stats` and torch-fidelity take."""
        return {"mu": self.mu, "sigma": self.sigma}


def part_range(count: int, rank: int, world: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous share [start, stop) of `count` rows (shares differ by at most one)."""
    return rank * count // world, (rank + 1) * count // world


def extractor(weights: Path, device: torch.device, names: tuple[str, ...]) -> torch.nn.Module:
    """torch-fidelity's Inception-v3 (FID-compatible) from a local weights file, giving the `names` outputs."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", list(names), feature_extractor_weights_path=str(weights))
    return net.to(device).eval()


def _cat(parts: Sequence[Tensor | None]) -> Tensor | None:
    return None if any(p is None for p in parts) else torch.cat(list(parts))  # type: ignore[arg-type]


def merge_stats(parts: Sequence[FeatureStats]) -> FeatureStats:
    """The statistics of the concatenated rows of `parts` (in order): what the torchrun reduction computes."""
    total, outer = parts[0].total.clone(), parts[0].outer.clone()
    for p in parts[1:]:
        total += p.total
        outer += p.outer
    return FeatureStats(count=sum(p.count for p in parts), total=total, outer=outer,
                        features=_cat([p.features for p in parts]), logits=_cat([p.logits for p in parts]))


def _gather_rows(rows: Tensor, sizes: list[int], device: torch.device) -> Tensor:
    """Every rank's (n_r, D) rows, concatenated in rank order (padded to the largest share for all_gather)."""
    import torch.distributed as tdist

    most = max(sizes)
    pad = torch.zeros(most, rows.shape[1], dtype=rows.dtype, device=device)
    pad[:rows.shape[0]] = rows.to(device)
    out = [torch.empty_like(pad) for _ in sizes]
    tdist.all_gather(out, pad)
    return torch.cat([o[:n].cpu() for o, n in zip(out, sizes)])


def _reduce(local: FeatureStats, count: int, dist: DistInfo) -> FeatureStats:
    """All-reduce the sums and all-gather the kept rows: every rank gets the whole source's statistics."""
    import torch.distributed as tdist

    dev = dist.device
    sums = [local.total.to(dev), local.outer.to(dev), torch.tensor([float(local.count)], dtype=torch.float64, device=dev)]
    for t in sums:
        tdist.all_reduce(t)
    sizes = [b - a for a, b in (part_range(count, r, dist.world_size) for r in range(dist.world_size))]
    return FeatureStats(count=int(sums[2].item()), total=sums[0].cpu(), outer=sums[1].cpu(),
                        features=None if local.features is None else _gather_rows(local.features, sizes, dev),
                        logits=None if local.logits is None else _gather_rows(local.logits, sizes, dev))


def reduce_stats(local: FeatureStats, dist: DistInfo | None) -> FeatureStats:
    """`local` summed over the torchrun ranks (sums only: no kept rows); unchanged in a single process."""
    import torch.distributed as tdist

    if dist is None or not dist.enabled or not tdist.is_initialized():
        return local
    if local.features is not None or local.logits is not None:
        raise ValueError("reduce_stats reduces sums only; use feature_stats to gather kept rows")
    return _reduce(local, local.count, dist)


class StatsAccumulator:
    """Running Inception sums of uint8 batches fed as they come (e.g. reconstructions made batch by batch).
    Several accumulators can share one `extractor` (`net`, pool features first); the sums stay on `device`."""

    def __init__(self, net: torch.nn.Module, device: torch.device) -> None:
        self.net, self.device, self.count = net, device, 0
        self.total = torch.zeros(FEATURE_DIM, dtype=torch.float64, device=device)
        self.outer = torch.zeros(FEATURE_DIM, FEATURE_DIM, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, images: Tensor) -> None:
        """Feed (B, 3, H, W) uint8 images (torch-fidelity resizes them to 299)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception needs uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] == 0:
            return
        f = self.net(images.to(self.device))[0].double()  # (B, F)
        self.total += f.sum(0)
        self.outer += f.T @ f
        self.count += int(f.shape[0])

    def local(self) -> FeatureStats:
        """This process's sums so far (CPU tensors)."""
        return FeatureStats(count=self.count, total=self.total.cpu(), outer=self.outer.cpu())

    def result(self, dist: DistInfo | None = None) -> FeatureStats:
        """The sums over all ranks under torchrun (every rank gets them), else this process's."""
        return reduce_stats(self.local(), dist)


@torch.no_grad()
def feature_stats(source: ImageSource, weights: Path, device: torch.device, *, batch: int = 64,
                  keep_features: bool = True, logits: bool = False, dist: DistInfo | None = None,
                  progress: Progress = SILENT, stage: str = "features",
                  net: torch.nn.Module | None = None) -> FeatureStats:
    """One pass of Inception over `source` in chunks of `batch` images (torch-fidelity resizes them to 299).
    `net`: an `extractor` to reuse (building one costs seconds), giving the pool features first, then logits.

    With `dist` (a torchrun job: torch.distributed initialised) this rank reads only its `part_range` and the
    result is reduced over all ranks; a `dist` without a process group (tests) gives this rank's part alone."""
    import torch.distributed as tdist

    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    start, stop = part_range(source.count, rank, world)
    net = net or extractor(weights, device, (POOL, LOGITS) if logits else (POOL,))
    total = torch.zeros(FEATURE_DIM, dtype=torch.float64, device=device)
    outer = torch.zeros(FEATURE_DIM, FEATURE_DIM, dtype=torch.float64, device=device)
    kept: list[Tensor] = []
    kept_logits: list[Tensor] = []
    progress.start(stage, stop - start, source=source.name, images=source.count, device=str(device))
    t0, done = time.perf_counter(), 0
    for x in source.batches(start, stop, batch):  # (B, 3, H, W) uint8
        out = net(x.to(device))
        f = out[0].double()  # (B, F)
        total += f.sum(0)
        outer += f.T @ f
        if keep_features:
            kept.append(out[0].float().cpu())
        if logits:
            kept_logits.append(out[1].float().cpu())
        done += x.shape[0]
        progress.advance(x.shape[0], rate=done / max(time.perf_counter() - t0, 1e-9))
    local = FeatureStats(
        count=done, total=total.cpu(), outer=outer.cpu(),
        features=(torch.cat(kept) if kept else torch.zeros(0, FEATURE_DIM)) if keep_features else None,
        logits=(torch.cat(kept_logits) if kept_logits else torch.zeros(0, 1008)) if logits else None,
    )
    if dist is not None and dist.enabled and tdist.is_initialized():
        return _reduce(local, source.count, dist)
    return local
