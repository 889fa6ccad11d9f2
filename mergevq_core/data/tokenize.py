"""Stage-2 data: encode a dataset once with a trained tokenizer into token shards (`shard_writer.ShardWriter`).

Each image is stored in several views (`views.TokenizeViews`: LlamaGen's ten-crop + flip by default, or the
centre crop and its mirror, or the centre crop alone) and each view is encoded at its own K: the recipe's K,
`tokens`, or with `tokens_sample` one drawn by the recipe's keep-count sampler from a generator seeded by
(seed, image index, view), so a resumed or a multi-process run draws the same K. Stage 2 then sees one view per
item per epoch (`codes.EpochViews`), and with `tokens_sample` a merge ratio per view (the paper, §4.1).

Images are decoded and cut into views by DataLoader workers; the main process only encodes. Under torchrun
rank r encodes the pending shards r, r + world, ...; every shard is encoded in the same batches whichever rank
takes it (forward passes grouped by K inside the shard, in item order), so the files equal a single process's
bit for bit. Finished shards are kept, so an interrupted run resumes where it stopped; shards of another
tokenizer or other settings are refused.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .. import checkpoint as ck
from ..errors import DataError
from ..progress import SILENT, Progress

__all__ = ["TokenizeResult", "tokenize_dataset"]


@dataclass
class TokenizeResult:
    out: str
    ckpt: str
    items: int
    views: int  # views stored per item
    view_mode: str
    encoded: int  # images encoded by this call, all ranks (the rest were in shards kept from before)
    skipped_shards: int
    wall_s: float
    img_per_s: float  # images (each with all its views) per second, all ranks together
    views_per_s: float
    tokens: int | str  # K, or "sample"
    processes: int = 1
    workers: int = 0
    precision: str = "fp32"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _ViewItems(Dataset):
    """(position, views, label, error) of dataset item `position`: a file that cannot be read comes back as its
    error message, raised by the main process as one `DataError` line (raised inside a DataLoader worker it would
    reach the user wrapped in a traceback)."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, int, str]:
        try:
            item = self.ds[i]
        except DataError as e:
            return i, None, -1, str(e)
        return i, item["views"], int(item["label"]), ""


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


class _ShardBatches:
    """Batches of item positions that never cross a shard: `images` items at a time through the given shards."""

    def __init__(self, writer: Any, shards: list[int], images: int) -> None:
        self.batches = [list(r[s : s + images]) for i in shards for r in [writer.item_range(i)]
                        for s in range(0, len(r), images)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _keep_counts(sampler: Any, keep: int, seed: int, index: int, views: int) -> list[int]:
    """K of each view of item `index`: the fixed K, or drawn from (seed, index) for view 0 (as one-view shards
    always drew it) and (seed, index, view) for the others."""
    from .rng import make_generator

    if sampler is None:
        return [keep] * views
    return [sampler.sample(make_generator(seed, index) if v == 0 else make_generator(seed, index, v)) for v in range(views)]


def tokenize_dataset(tok: Any, ckpt: Path, data: str | Path, out: str | Path, *, tokens: int | None = None,
                     tokens_sample: bool = False, views: str = "ten-crop", crop_range: float | None = None,
                     limit: int | None = None, batch: int = 64, shard_size: int = 4096, workers: int = 0,
                     seed: int = 0, dist: Any = None, progress: Progress = SILENT,
                     precision: str = "fp32") -> TokenizeResult:
    """Encode `data` (a folder, `shapes` or `photos`; see `data.sources`) with the tokenizer `tok` loaded from
    checkpoint `ckpt` into shards under `out`. `batch`: views per forward pass. `crop_range` (default 1.1 for
    ten-crop, else 1.0): the square the crops are cut from, as a multiple of the image size. `precision`: fp32,
    or bf16 autocast around encode (recorded in the manifest: a resume must use the same)."""
    import torch.distributed as tdist
    from torch.utils.data import DataLoader, Subset

    from ..config import config_to_dict
    from ..dist import all_reduce_sum
    from ..fileio import sha256_file
    from ..precision import autocast, check_precision
    from ..tome import KeepSampler
    from .shard_writer import ShardWriter
    from .sources import open_images
    from .views import TokenizeViews

    on = dist is not None and dist.enabled and tdist.is_initialized()
    rank, world = (dist.rank, dist.world_size) if on else (0, 1)
    cfg = tok.cfg
    precision = check_precision(precision)
    keep = cfg.check_keep(tokens) if tokens is not None else cfg.merge.keep
    view = TokenizeViews(cfg.model.image_size, views, (1.1 if views == "ten-crop" else 1.0) if crop_range is None else crop_range)
    nv = view.count
    ds, info = open_images(data, cfg.model.image_size, length=limit, seed=seed, view=view)
    if limit is not None and limit < len(ds):
        ds = Subset(ds, range(limit))
    info["items"] = len(ds)
    settings = dict(
        tokenizer_info={"checkpoint": str(ckpt), "hash": sha256_file(ck.weights_file(ckpt, "ema")), "config": config_to_dict(cfg)},
        codebook_size=tok.quantizer.codebook_size, n_tokens=cfg.model.n_tokens, grid=cfg.model.grid,
        tokens_mode="sample" if tokens_sample else "fixed", keep=keep, dataset_info=info, num_items=len(ds),
        shard_size=shard_size, views=view.describe(), precision=precision,
    )
    writer = ShardWriter(out, **settings, owner=True) if rank == 0 else None  # type: ignore[arg-type]
    if on:
        tdist.barrier()  # rank 0 has checked and cleaned the folder and written its manifest
    if writer is None:
        writer = ShardWriter(out, **settings, owner=False)  # type: ignore[arg-type]
    sampler = KeepSampler(keep, cfg.model.n_tokens, cfg.merge.sampler, cfg.merge.candidates, cfg.min_keep) if tokens_sample else None
    dev = next(tok.parameters()).device
    pending = writer.pending()
    mine = pending[rank::world]
    todo_all = sum(len(writer.item_range(i)) for i in pending)
    todo = sum(len(writer.item_range(i)) for i in mine)
    progress.start("tokenize", len(ds), len(ds) - todo_all, ckpt=str(ckpt), out=str(out), views=nv, processes=world)
    loader = DataLoader(_ViewItems(ds), batch_sampler=_ShardBatches(writer, mine, max(1, batch // nv)),
                        num_workers=workers, collate_fn=_as_list, pin_memory=dev.type == "cuda")
    scale = todo_all / todo if todo else 1.0  # rank 0's progress stands for every rank's (they move at about one pace)
    t0, done = time.perf_counter(), 0
    state: dict[str, Any] = {}

    def flush(group: list[tuple[int, int, Tensor]], k: int) -> None:
        """Encode one forward pass of views (slot, view, image) at K = k into the shard's arrays."""
        x = torch.stack([TokenizeViews.signed(img) for _, _, img in group]).to(dev, non_blocking=True)
        with autocast(precision, dev):
            enc = tok.encode(x, tokens=k)
        ids, assign = enc.ids.cpu(), enc.assign.cpu()
        for n, (j, v, _) in enumerate(group):
            state["ids"][j * nv + v] = ids[n]
            state["assign"][j, v] = assign[n]

    with torch.no_grad():
        it = iter(loader)
        for shard in mine:
            idx = list(writer.item_range(shard))
            start = idx[0]
            state["ids"] = [None] * (len(idx) * nv)
            state["assign"] = torch.empty(len(idx), nv, cfg.model.n_tokens, dtype=torch.long)
            labels = torch.empty(len(idx), dtype=torch.long)
            groups: dict[int, list[tuple[int, int, Tensor]]] = {}
            seen = 0
            while seen < len(idx):
                part = next(it)
                for pos, img, label, err in part:
                    if err:
                        raise DataError(err)
                    j = pos - start
                    labels[j] = label
                    for v, k in enumerate(_keep_counts(sampler, keep, seed, pos, nv)):
                        g = groups.setdefault(k, [])
                        g.append((j, v, img[v]))
                        if len(g) >= batch:
                            flush(g, k)
                            groups[k] = []
                seen += len(part)
                done += len(part)
                progress.advance(len(part) * scale, rate=done * scale / max(time.perf_counter() - t0, 1e-9))
            for k in sorted(groups):
                if groups[k]:
                    flush(groups[k], k)
            writer.write(shard, state["ids"], state["assign"], labels, torch.tensor(idx))
    if on:
        tdist.barrier()  # every rank's shards are on disk
    if rank == 0:
        writer.adopt()
        writer.finish()
    wall = time.perf_counter() - t0
    encoded = int(round(all_reduce_sum([float(todo)], dev)[0])) if on else todo
    slowest = max(all_reduce_sum([wall if r == rank else 0.0 for r in range(world)], dev)) if on else wall
    return TokenizeResult(out=str(out), ckpt=str(ckpt), items=len(ds), views=nv, view_mode=views, encoded=encoded,
                          skipped_shards=writer.num_shards - len(pending), wall_s=slowest,
                          img_per_s=encoded / slowest if slowest > 0 else 0.0,
                          views_per_s=encoded * nv / slowest if slowest > 0 else 0.0,
                          tokens="sample" if tokens_sample else keep, processes=world, workers=workers,
                          precision=precision)
