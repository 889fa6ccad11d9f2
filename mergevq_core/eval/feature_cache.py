"""Frozen-encoder features, extracted once and kept on disk as fp16 shards, for the probe's 90 epochs.

A feature set lives in `<cache>/probe/<key>/` where the key covers the checkpoint's weights (`cache.checkpoint_hash`),
K, the view (centre crop at the model's size) and exactly which images the split holds (its fingerprint). It
holds `shard-NNNNN.npz` files of `SHARD_ROWS` rows (`features` (R, 2C) fp16, `pixels` (R, P) fp16: the image
area-downsampled to at most 32×32, for the raw-pixel baseline; `labels` (R,) int64) and, once every shard is in
place, `manifest.json`. Rows are stored in a fixed shuffled order of the split (seeded by the key, not the run),
so that every shard mixes the classes and reading a few shards at a time gives well-mixed batches.

Extraction streams the images through a DataLoader with workers; under torchrun rank r writes shards r, r + W,
...; a shard is written atomically and an interrupted extraction resumes at the first missing shard. Reading
(`FeatureSet.batches`) holds `window` shards at a time, so host memory is flat in the number of images.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..cache import cache_root, key_of
from ..data.labelled import LabelledSplit
from ..dist import DistInfo
from ..errors import DataError
from ..fileio import write_atomic
from ..progress import SILENT, Progress

__all__ = ["FEATURE_VERSION", "SHARD_ROWS", "FeatureSet", "encoder_features", "extract_features"]

FEATURE_VERSION = "probe-features-v1"
SHARD_ROWS = 1024
PIXEL_SIDE = 32  # the raw-pixel baseline's images are area-downsampled to at most this side


@torch.no_grad()
def encoder_features(tok: Any, images: Tensor, schedule: tuple[int, ...]) -> Tensor:
    """images (B, 3, H, W) in [-1, 1] → (B, 2C): the output tokens averaged with their ToMe sizes (a merged token
    weighs what it covers) ‖ the cls token."""
    enc = tok.encoder(images, schedule)
    w = enc.size / enc.size.sum(1, keepdim=True)  # (B, K)
    pooled = (enc.tokens * w[..., None]).sum(1)  # (B, C)
    return torch.cat([pooled, enc.cls], dim=1).float()


def pixel_features(images: Tensor) -> Tensor:
    """(B, 3, H, W) → (B, 3·s·s) with s = min(H, 32): the images area-downsampled, flattened."""
    side = min(images.shape[-1], PIXEL_SIDE)
    if side != images.shape[-1]:
        images = F.interpolate(images.float(), size=(side, side), mode="area")
    return images.flatten(1).float()


@dataclass
class FeatureSet:
    """A complete feature set on disk: `count` rows in `shards` (paths), `dim`-d features, `pixel_dim`-d pixels."""

    folder: Path
    count: int
    dim: int
    pixel_dim: int
    shards: list[Path]
    cached: bool  # True when this run found it already extracted
    _resident: dict = field(default_factory=dict, repr=False)  # shards kept loaded when they fit in one window

    @classmethod
    def open(cls, folder: Path, cached: bool) -> "FeatureSet":
        m = json.loads((folder / "manifest.json").read_text())
        shards = [folder / f"shard-{s:05d}.npz" for s in range(m["shards"])]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise DataError(f"feature cache {folder} lacks {missing[0]}: delete the folder to extract again")
        return cls(folder, int(m["count"]), int(m["dim"]), int(m["pixel_dim"]), shards, cached)

    @classmethod
    def from_arrays(cls, folder: Path, features: Tensor, labels: Tensor, pixels: Tensor | None = None) -> "FeatureSet":
        """Write (M, D) `features`, (M,) `labels` (and (M, P) `pixels`) as a feature set in `folder` (tests, features
        made elsewhere)."""
        folder.mkdir(parents=True, exist_ok=True)
        pixels = features[:, :1] if pixels is None else pixels
        n = len(labels)
        for s, i in enumerate(range(0, n, SHARD_ROWS)):
            _write_shard(folder / f"shard-{s:05d}.npz", features[i:i + SHARD_ROWS], pixels[i:i + SHARD_ROWS],
                         labels[i:i + SHARD_ROWS])
        manifest = {"version": FEATURE_VERSION, "count": n, "shards": -(-n // SHARD_ROWS), "rows_per_shard": SHARD_ROWS,
                    "dim": int(features.shape[1]), "pixel_dim": int(pixels.shape[1])}
        write_atomic(folder / "manifest.json", json.dumps(manifest).encode())
        return cls.open(folder, cached=False)

    def _load(self, shard: Path, members: tuple[str, ...]) -> tuple[dict[str, Tensor], Tensor]:
        """({member: (R, D) fp16}, labels (R,) int64) of one shard."""
        try:
            with np.load(shard) as z:
                return {m: torch.from_numpy(z[m]) for m in members}, torch.from_numpy(z["labels"])
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"cannot read {shard}: {e} (delete {self.folder} to extract again)") from None

    def sequential(self, batch: int, members: tuple[str, ...] = ("features",)
                   ) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        """Every row once, in stored order: ({member: (B, D) float32}, y (B,) int64)."""
        for shard in self.shards:
            xs, y = self._load(shard, members)
            for i in range(0, len(y), batch):
                yield {m: x[i:i + batch].float() for m, x in xs.items()}, y[i:i + batch]

    def batches(self, epoch: int, batch: int, seed: int, members: tuple[str, ...] = ("features",),
                window: int = 8) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        """One epoch of shuffled batches ({member: (B, D) float32}, y (B,)): the shards in an order drawn from
        (seed, epoch), `window` of them at a time shuffled together; the rows left over from one window open the
        next; the last partial batch is kept. Rows stay fp16 in memory and are converted one batch at a time; a
        set of at most `window` shards is read once and kept."""
        from ..data.rng import make_generator

        g = make_generator(seed, epoch)
        order = torch.randperm(len(self.shards), generator=g).tolist()
        resident = len(self.shards) <= window
        if resident and self._resident.get("members") != members:
            self._resident = {"members": members, "data": self._window(list(range(len(self.shards))), members)}
        carry: tuple[dict[str, Tensor], Tensor] | None = None
        for w in range(0, len(order), window):
            if resident:  # the kept rows, in shard order, read as the window of shards `order` names
                xs, y = self._resident["data"]
                idx = torch.cat([torch.arange(s * SHARD_ROWS, min((s + 1) * SHARD_ROWS, self.count)) for s in order])
            else:
                xs, y = self._window(order[w:w + window], members)
                idx = torch.arange(len(y))
            if carry is not None:
                xs = {m: torch.cat([carry[0][m], xs[m]]) for m in members}
                y = torch.cat([carry[1], y])
                idx = torch.cat([torch.arange(len(carry[1])), idx + len(carry[1])])
            idx = idx[torch.randperm(len(idx), generator=g)]
            full = len(idx) // batch * batch
            for i in range(0, full, batch):
                b = idx[i:i + batch]
                yield {m: x[b].float() for m, x in xs.items()}, y[b]
            rest = idx[full:]
            carry = ({m: x[rest] for m, x in xs.items()}, y[rest]) if len(rest) else None
        if carry is not None:
            yield {m: x.float() for m, x in carry[0].items()}, carry[1]

    def _window(self, shards: list[int], members: tuple[str, ...]) -> tuple[dict[str, Tensor], Tensor]:
        parts = [self._load(self.shards[s], members) for s in shards]
        return {m: torch.cat([p[0][m] for p in parts]) for m in members}, torch.cat([p[1] for p in parts])


def feature_key(ckpt_hash: str, k: int, split: LabelledSplit, size: int) -> str:
    return key_of(FEATURE_VERSION, ckpt_hash, k, split.fingerprint, f"centre-crop-{size}", PIXEL_SIDE)


def _write_shard(path: Path, feats: Tensor, pixels: Tensor, labels: Tensor) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, features=feats.numpy().astype(np.float16), pixels=pixels.numpy().astype(np.float16),
             labels=labels.numpy().astype(np.int64))
    write_atomic(path, buf.getvalue())


@torch.no_grad()
def extract_features(tok: Any, ckpt_hash: str, split: LabelledSplit, k: int, *, cache: str | Path | None = None,
                     batch: int = 256, workers: int = 0, dist: DistInfo | None = None,
                     progress: Progress = SILENT) -> FeatureSet:
    """The split's features at K = `k`: read from the cache when complete, else extracted (resuming the shards
    already written) and cached. Under torchrun every rank calls this and gets the same set."""
    from torch.utils.data import DataLoader, Subset

    from ..data.rng import derive_seed

    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    size = tok.cfg.model.image_size
    key = feature_key(ckpt_hash, k, split, size)
    folder = cache_root(cache) / "probe" / key
    if (folder / "manifest.json").is_file():
        if rank == 0:
            progress.note(f"{split.name}: reusing cached features {folder}")
        return FeatureSet.open(folder, cached=True)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the feature cache {folder}: {e.strerror or e} (set --cache DIR)") from None
    n_shards = -(-split.count // SHARD_ROWS)
    order = torch.randperm(split.count, generator=torch.Generator().manual_seed(derive_seed(int(key, 16)))).tolist()
    mine = [s for s in range(rank, n_shards, world) if not (folder / f"shard-{s:05d}.npz").is_file()]
    rows = [order[i] for s in mine for i in range(s * SHARD_ROWS, min((s + 1) * SHARD_ROWS, split.count))]
    resumed = len(range(rank, n_shards, world)) - len(mine)  # this rank's shards an earlier run wrote
    if rank == 0:
        progress.start(f"features ({split.name})", len(rows), images=split.count, tokens=k, cache=str(folder),
                       resumed_shards=resumed)
    dev = next(tok.parameters()).device
    schedule = tok.schedule(k)
    buf: list[tuple[Tensor, Tensor, Tensor]] = []
    pending = list(mine)
    t0, seen = time.perf_counter(), 0
    if rows:
        loader = DataLoader(Subset(split.dataset, rows), batch_size=batch, num_workers=workers, shuffle=False,
                            pin_memory=dev.type == "cuda")
        for item in loader:
            x = item["image"].to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                f = encoder_features(tok, x, schedule)
            buf.append((f.cpu(), pixel_features(x).cpu(), torch.as_tensor(item["label"])))
            seen += len(x)
            if rank == 0:
                progress.advance(len(x), rate=seen / max(time.perf_counter() - t0, 1e-9))
            buf = _flush(folder, buf, pending, split.count)
    _finish(folder, split, n_shards, dist, key)
    return FeatureSet.open(folder, cached=False)


def _flush(folder: Path, buf: list[tuple[Tensor, Tensor, Tensor]], pending: list[int],
           count: int) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Write every shard of `pending` whose rows are all in `buf`; return the rows left over."""
    have = sum(len(b[2]) for b in buf)
    while pending:
        s = pending[0]
        need = min((s + 1) * SHARD_ROWS, count) - s * SHARD_ROWS
        if have < need:
            break
        f, p, y = (torch.cat([b[i] for b in buf]) for i in range(3))
        _write_shard(folder / f"shard-{s:05d}.npz", f[:need], p[:need], y[:need])
        pending.pop(0)
        buf = [(f[need:], p[need:], y[need:])] if need < len(y) else []
        have -= need
    return buf


def _finish(folder: Path, split: LabelledSplit, n_shards: int, dist: DistInfo | None, key: str) -> None:
    """After every rank wrote its shards: rank 0 checks them and writes the manifest (the mark of completeness)."""
    import torch.distributed as tdist

    if dist is not None and dist.enabled and tdist.is_initialized():
        tdist.barrier()
    if dist is None or dist.is_main:
        first = folder / "shard-00000.npz"
        with np.load(first) as z:
            dim, pixel_dim = int(z["features"].shape[1]), int(z["pixels"].shape[1])
        missing = [s for s in range(n_shards) if not (folder / f"shard-{s:05d}.npz").is_file()]
        if missing:
            raise DataError(f"feature cache {folder}: shard {missing[0]} was not written")
        manifest = {"version": FEATURE_VERSION, "key": key, "count": split.count, "shards": n_shards,
                    "rows_per_shard": SHARD_ROWS, "dim": dim, "pixel_dim": pixel_dim, "source": split.source,
                    "split": split.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid()}
        write_atomic(folder / "manifest.json", json.dumps(manifest, indent=2).encode())
    if dist is not None and dist.enabled and tdist.is_initialized():
        tdist.barrier()
