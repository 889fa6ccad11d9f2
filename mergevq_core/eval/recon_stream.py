"""The streaming pass of `mergevq reconstruct`: image files decoded by DataLoader workers and encoded / decoded
at every K batch by batch, with the metrics kept as running sums, so that host memory stays flat in the number
of images (ImageNet's 50,000 validation images on 8 GPUs).

Under torchrun each rank takes the contiguous files `part_range(len(files), rank, world)`. PSNR / SSIM / LPIPS
are float64 sums, all-reduced; codebook usage is a bit set over the codebook per K, OR-reduced (MAX); rFID comes
from the running Inception sums of the originals and of each K's reconstructions (`eval.streaming`), reduced
over the ranks (rank 0 takes the Fréchet distances, a matrix square root each, and shares them). Every rank
ends with the same means.

Per-image rows stream to `out/.per_image.rank{r}.jsonl`; after a barrier rank 0 concatenates them in rank order
(which is image order) into `out/per_image.jsonl`. Triptychs are written for the first `save` images only, each
by the rank that holds the image.

The originals' Inception sums depend only on the files, the size and the Inception weights: they are cached as
an .npz under `cache.cache_root()/recon-fid/` (written atomically by rank 0) and a later run reads them instead
of running Inception over the originals again.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from ..cache import cache_root, files_fingerprint, key_of
from ..data.images import load_rgb
from ..dist import DistInfo, all_reduce_sum
from ..errors import DataError
from ..fileio import write_atomic
from ..progress import SILENT, Progress
from .fid import to_uint8
from .metrics import psnr
from .streaming import FEATURE_DIM, POOL, FeatureStats, StatsAccumulator, extractor, part_range

__all__ = ["ImageFiles", "StreamResult", "cached_reference", "reference_cache_file", "stream_reconstruct"]

VIEW = "recon_view-eval-1"  # change it when the evaluation view changes: old cache entries are then never read
PER_IMAGE = "per_image.jsonl"


class ImageFiles(Dataset):
    """Image `files` in the evaluation view: item i is (i, (3, size, size) in [-1, 1], error). An unreadable file
    gives a blank image and its one-line DataError message, for the main process to raise (an exception raised in
    a DataLoader worker would reach the user wrapped in a traceback)."""

    def __init__(self, files: list[Path], size: int) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, Tensor, str]:
        from ..data.views import recon_view

        try:
            return i, recon_view(load_rgb(self.files[i]), self.size, torch.Generator(), train=False), ""
        except DataError as e:
            return i, torch.zeros(3, self.size, self.size), str(e)


# ----------------------------------------------------------------------------- the originals' statistics, cached


def reference_cache_file(files: list[Path], size: int, weights: Path, cache: str | Path | None = None) -> Path:
    """Where the originals' Inception sums of `files` at `size` with `weights` are cached: keyed by the files'
    absolute paths, sizes and modification times, the size, the view and the weights file (path, size, mtime)."""
    st = os.stat(weights)
    wid = [os.path.abspath(weights), st.st_size, st.st_mtime_ns]
    key = key_of(VIEW, files_fingerprint([Path(os.path.abspath(f)) for f in files]), size, wid)
    return cache_root(cache) / "recon-fid" / f"originals-{size}px-{key}.npz"


def _read_cached(path: Path) -> FeatureStats | None:
    """The sums in a cache entry; None when it is absent or unreadable (then they are computed again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            count, total, outer = int(z["count"]), z["total"].astype(np.float64), z["outer"].astype(np.float64)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    if total.shape != (FEATURE_DIM,) or outer.shape != (FEATURE_DIM, FEATURE_DIM) or count < 2:
        return None
    return FeatureStats(count=count, total=torch.from_numpy(total), outer=torch.from_numpy(outer))


def _write_cached(path: Path, fs: FeatureStats) -> None:
    buf = io.BytesIO()
    np.savez(buf, total=fs.total.numpy(), outer=fs.outer.numpy(), count=np.int64(fs.count))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())


def cached_reference(path: Path | None, dist: DistInfo | None) -> FeatureStats | None:
    """Rank 0 reads the cache entry at `path` (None: absent or unreadable); under torchrun it broadcasts what it
    found, so that all ranks agree on whether the originals need an Inception pass."""
    import torch.distributed as tdist

    fs = _read_cached(path) if path is not None else None
    if dist is None or not dist.enabled or not tdist.is_initialized():
        return fs
    dev = dist.device
    count = torch.tensor([0 if fs is None else fs.count], dtype=torch.int64, device=dev)
    tdist.broadcast(count, src=0)
    if int(count.item()) == 0:
        return None
    total = fs.total.to(dev) if fs is not None else torch.empty(FEATURE_DIM, dtype=torch.float64, device=dev)
    outer = fs.outer.to(dev) if fs is not None else torch.empty(FEATURE_DIM, FEATURE_DIM, dtype=torch.float64,
                                                                 device=dev)
    tdist.broadcast(total, src=0)
    tdist.broadcast(outer, src=0)
    return FeatureStats(count=int(count.item()), total=total.cpu(), outer=outer.cpu())


# ----------------------------------------------------------------------------- the pass


@dataclass
class StreamResult:
    count: int  # images evaluated (all ranks)
    mean: dict[int, dict[str, float]]
    records: list[Any] = field(default_factory=list)  # ReconRecord of the saved images, in image order
    per_image: Path | None = None
    fid_reference_cached: bool | None = None  # None: no rFID


def _part(out: Path, rank: int) -> Path:
    return out / f".per_image.rank{rank}.jsonl"


def _merge_parts(out: Path, world: int) -> Path:
    """Concatenate the ranks' per-image parts in rank order into `out/per_image.jsonl` (atomically, streamed)."""
    target = out / PER_IMAGE
    fd, tmp = tempfile.mkstemp(prefix=f".{PER_IMAGE}.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "wb") as f:
            for r in range(world):
                with open(_part(out, r), "rb") as src:
                    shutil.copyfileobj(src, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for r in range(world):
        _part(out, r).unlink(missing_ok=True)
    return target


def _gather_records(records: list[Any], on: bool) -> list[Any]:
    if not on:
        return records
    import torch.distributed as tdist

    parts: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(parts, records)
    return [r for p in parts for r in p]


@torch.no_grad()
def stream_reconstruct(
    tok: Any, files: list[Path], ks: list[int], source: str, out: Path, *, names: list[str],
    lpips: Callable[[Tensor, Tensor], Tensor] | None = None, batch: int = 16, workers: int = 0, save: int = 32,
    fid_weights: Path | None = None, cache: str | Path | None = None, dist: DistInfo | None = None,
    progress: Progress = SILENT, precision: str = "fp32", **info: Any,
) -> StreamResult:
    """Encode / decode this rank's part of `files` at every K in `ks`, streaming per-image rows to disk and
    keeping only sums; triptychs (`names[j]_k{K}.png`) for images j < `save`. Returns the means over all ranks.
    `precision`: fp32, or bf16 autocast around encode / decode (the metrics are computed in fp32)."""
    import torch.distributed as tdist

    from ..precision import autocast
    from .quality import ssim
    from .reconstruct import ReconRecord, save_triptych

    on = dist is not None and dist.enabled and tdist.is_initialized()
    rank, world = (dist.rank, dist.world_size) if on and dist is not None else (0, 1)
    main = rank == 0
    device = next(tok.parameters()).device
    grid, size, codebook = tok.cfg.model.grid, tok.cfg.model.image_size, tok.quantizer.codebook_size
    start, stop = part_range(len(files), rank, world)
    fields = ["psnr", "ssim"] + (["lpips"] if lpips is not None else []) \
        + (["psnr_gt_source"] if source == "predicted" else [])
    sums = {k: dict.fromkeys(fields, 0.0) for k in ks}
    used = torch.zeros(len(ks), codebook, dtype=torch.uint8, device=device)  # bit set of ids seen, per K

    cached = ref = cache_file = None
    recs: dict[int, StatsAccumulator] = {}
    if fid_weights is not None:
        net = extractor(fid_weights, device, (POOL,))  # one network for every pass
        cache_file = reference_cache_file(files, size, fid_weights, cache) if main else None
        cached = cached_reference(cache_file, dist)
        if cached is not None and main:
            progress.note(f"rFID: the originals' Inception statistics ({cached.count} images) come from the cache "
                          f"({cache_file})")
        ref = StatsAccumulator(net, device) if cached is None else None
        recs = {k: StatsAccumulator(net, device) for k in ks}

    loader = DataLoader(Subset(ImageFiles(files, size), range(start, stop)), batch_size=batch, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda")
    part, saved, done, t0 = _part(out, rank), [], 0, time.perf_counter()
    progress.start("reconstruct", stop - start, images=len(files), tokens=ks, precision=precision, **info)
    try:
        with open(part, "w", encoding="utf-8") as fh:
            for idx, x, err in loader:
                bad = next((e for e in err if e), None)
                if bad:
                    raise DataError(bad)
                x = x.to(device, non_blocking=True)
                if ref is not None:
                    ref.add(to_uint8(x))
                rows: list[list[Any]] = [[] for _ in range(len(x))]
                for ki, k in enumerate(ks):
                    with autocast(precision, device):
                        enc = tok.encode(x, tokens=k)
                        assign = tok.predict_assign(enc.ids) if source == "predicted" else enc.assign
                        rec = tok.decode(enc.ids, assign).float().clamp(-1, 1)
                        gt_rec = tok.decode(enc.ids, enc.assign).float().clamp(-1, 1) if source == "predicted" else None
                    used[ki, enc.ids.flatten()] = 1
                    m = {"psnr": psnr(rec, x).cpu(), "ssim": ssim(rec.cpu(), x.cpu())}
                    if lpips is not None:
                        m["lpips"] = torch.tensor([float(lpips(rec[i:i + 1], x[i:i + 1])) for i in range(len(x))])
                    if gt_rec is not None:
                        m["psnr_gt_source"] = psnr(gt_rec, x).cpu()
                    for name, v in m.items():
                        sums[k][name] += float(v.double().sum())
                    if k in recs:
                        recs[k].add(to_uint8(rec))
                    for i in range(len(x)):
                        j = int(idx[i])
                        target = out / f"{names[j]}_k{k}.png" if j < save else None
                        if target is not None:
                            save_triptych(target, x[i].cpu(), rec[i].cpu(), assign[i].cpu(), grid)
                        rows[i].append(ReconRecord(
                            path=str(files[j]), tokens=k, psnr=float(m["psnr"][i]), ssim=float(m["ssim"][i]),
                            output=None if target is None else str(target),
                            lpips=float(m["lpips"][i]) if "lpips" in m else None,
                            psnr_gt_source=float(m["psnr_gt_source"][i]) if "psnr_gt_source" in m else None))
                for i, rs in enumerate(rows):  # image order, K within an image
                    fh.write("".join(json.dumps(r.to_json()) + "\n" for r in rs))
                    if int(idx[i]) < save:
                        saved.extend(rs)
                done += len(x)
                progress.advance(len(x), rate=done / max(time.perf_counter() - t0, 1e-9))
    except BaseException:
        part.unlink(missing_ok=True)
        raise

    if on:
        tdist.barrier()  # every part is complete
    per_image = _merge_parts(out, world) if main else out / PER_IMAGE
    totals = all_reduce_sum([float(done)] + [sums[k][f] for k in ks for f in fields], device)
    count, values = int(round(totals[0])), iter(totals[1:])
    mean = {k: {f: next(values) / count for f in fields} for k in ks}
    if on:
        tdist.all_reduce(used, op=tdist.ReduceOp.MAX)
    for ki, k in enumerate(ks):
        if "psnr_gt_source" in mean[k]:
            mean[k]["gap_db"] = mean[k]["psnr_gt_source"] - mean[k]["psnr"]
        mean[k]["codebook_usage"] = int(used[ki].sum()) / codebook
    if fid_weights is not None:
        from .gen_metrics import fid_from_stats

        real = cached if cached is not None else ref.result(dist)  # type: ignore[union-attr]
        if cached is None and cache_file is not None:
            try:
                _write_cached(cache_file, real)
            except OSError as e:
                progress.note(f"rFID: could not cache the originals' statistics at {cache_file}: {e}")
        fakes = [recs[k].result(dist) for k in ks]  # collectives: every rank takes part
        # the matrix square root of a 2048² covariance takes seconds: rank 0 computes it, the others get its value
        fids = all_reduce_sum([fid_from_stats(real.stats(), f.stats()) if main else 0.0 for f in fakes], device)
        for k, v in zip(ks, fids):
            mean[k]["rfid"] = v
    return StreamResult(count=count, mean=mean, records=_gather_records(saved, on), per_image=per_image,
                        fid_reference_cached=None if fid_weights is None else cached is not None)
