"""Stage-2 data: encode a dataset once with a trained tokenizer into token shards (`codes.ShardWriter`).

Each image is seen in the evaluation view (shorter side → size, centre crop) and encoded at K tokens: the ids in
canonical order, `assign` (the source matrix as one slot index per grid position), K and the label. Finished
shards are kept, so an interrupted run resumes where it stopped; shards of another tokenizer are refused. With
`tokens_sample` each image's K is drawn by the recipe's keep-count sampler from a generator seeded by
(seed, image index), so a resumed run draws the same K.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..progress import SILENT, Progress

__all__ = ["TokenizeResult", "tokenize_dataset"]


@dataclass
class TokenizeResult:
    out: str
    ckpt: str
    items: int
    encoded: int  # images encoded by this call (the rest were in shards kept from before)
    skipped_shards: int
    wall_s: float
    img_per_s: float
    tokens: int | str  # K, or "sample"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tokenize_dataset(tok: Any, ckpt: Path, data: str | Path, out: str | Path, *, tokens: int | None = None,
                     tokens_sample: bool = False, limit: int | None = None, batch: int = 64, shard_size: int = 4096,
                     seed: int = 0, progress: Progress = SILENT) -> TokenizeResult:
    """Encode `data` (a folder, `shapes` or `photos`; see `data.sources`) with the tokenizer `tok` loaded from
    checkpoint `ckpt` into shards under `out`."""
    from torch.utils.data import Subset

    from ..config import config_to_dict
    from ..fileio import sha256_file
    from ..tome import KeepSampler
    from .codes import ShardWriter
    from .rng import make_generator
    from .sources import open_images

    cfg = tok.cfg
    keep = cfg.check_keep(tokens) if tokens is not None else cfg.merge.keep
    ds, info = open_images(data, cfg.model.image_size, length=limit, seed=seed)
    if limit is not None and limit < len(ds):
        ds = Subset(ds, range(limit))
    info["items"] = len(ds)
    writer = ShardWriter(
        out, {"checkpoint": str(ckpt), "hash": sha256_file(ckpt / "ema.safetensors"), "config": config_to_dict(cfg)},
        codebook_size=tok.quantizer.codebook_size, n_tokens=cfg.model.n_tokens, grid=cfg.model.grid,
        tokens_mode="sample" if tokens_sample else "fixed", keep=keep, dataset_info=info, num_items=len(ds),
        shard_size=shard_size,
    )
    sampler = KeepSampler(keep, cfg.model.n_tokens, cfg.merge.sampler, cfg.merge.candidates, cfg.min_keep) if tokens_sample else None
    dev = next(tok.parameters()).device
    pending = writer.pending()
    todo = sum(len(writer.item_range(i)) for i in pending)
    progress.start("tokenize", len(ds), len(ds) - todo, ckpt=str(ckpt), out=str(out))
    t0, done = time.perf_counter(), 0
    with torch.no_grad():
        for shard in pending:
            idx = list(writer.item_range(shard))
            ks = [sampler.sample(make_generator(seed, i)) if sampler else keep for i in idx]
            ids: list[Any] = [None] * len(idx)
            assign = torch.empty(len(idx), cfg.model.n_tokens, dtype=torch.long)
            labels = torch.empty(len(idx), dtype=torch.long)
            for k in sorted(set(ks)):
                group = [j for j, kk in enumerate(ks) if kk == k]
                for s in range(0, len(group), batch):
                    part = group[s : s + batch]
                    items = [ds[idx[j]] for j in part]
                    enc = tok.encode(torch.stack([it["image"] for it in items]).to(dev), tokens=k)
                    for n, j in enumerate(part):
                        ids[j] = enc.ids[n].cpu()
                        assign[j] = enc.assign[n].cpu()
                        labels[j] = int(items[n]["label"])
                    done += len(part)
                    progress.advance(len(part), rate=done / max(time.perf_counter() - t0, 1e-9))
            writer.write(shard, ids, assign, labels, torch.tensor(idx))
    writer.finish()
    wall = time.perf_counter() - t0
    return TokenizeResult(out=str(out), ckpt=str(ckpt), items=len(ds), encoded=done,
                          skipped_shards=-(-len(ds) // shard_size) - len(pending), wall_s=wall,
                          img_per_s=done / wall if wall > 0 else 0.0, tokens="sample" if tokens_sample else keep)
