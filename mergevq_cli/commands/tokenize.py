"""`mergevq tokenize`: encode a dataset once into token shards for stage-2 training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..options import DeviceOpt, JsonOpt, PrecisionOpt, TokenizerOpt, checked_precision, finite

EXAMPLES = """
Examples:

  torchrun --nproc-per-node 8 -m mergevq_cli tokenize /data/imagenet/train --out tokens/gr-k144 \\
      --ckpt runs/gr-20261130-120000 --workers 8          # ten crops + flips per image (LlamaGen's extraction)

  mergevq tokenize shapes --limit 20000 --out tokens/tiny --tokens-sample    # each view draws its own K (MergeAR)

  mergevq tokenize /data/imagenet/train --out tokens/gr-center --views center  # one centre crop per image

  mergevq tokenize /data/imagenet/train --out tokens/gr-k144                 # again: resumes, skipping finished shards
"""

VIEW_MODES = ("ten-crop", "flip", "center")


def tokenize(
    data: Annotated[str, typer.Argument(help="An image folder (class subfolders give labels), or `shapes` / `photos`.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the shards and manifest.json.")],
    ckpt: TokenizerOpt = None,
    tokens: Annotated[Optional[int], typer.Option("--tokens", "-k", min=1, help="Keep K tokens per view (default: the recipe's merge.keep).")] = None,
    tokens_sample: Annotated[bool, typer.Option("--tokens-sample", help="Draw K per view with the recipe's keep-count sampler.")] = False,
    views: Annotated[str, typer.Option("--views", help="Views stored per image: ten-crop (centre + 4 corners, each also mirrored: 10), flip (centre + mirror: 2) or center (1). Stage 2 draws one per item per epoch.")] = "ten-crop",
    crop_range: Annotated[Optional[float], typer.Option("--crop-range", callback=finite, min=1.0, max=2.0, help="Crops are cut from the centred square of side image size × this (default 1.1 for ten-crop, 1.0 otherwise).", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Encode only the first N items (shapes: how many to generate, default 10000).")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Views per forward pass.")] = 64,
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Images per shard file.")] = 4096,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Image-decoding worker processes (0: in the main process).")] = 0,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed for the shapes data and --tokens-sample.")] = 0,
    precision: PrecisionOpt = "fp32",
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Encode DATA into token shards (ids, assign, K per view; label) for `mergevq train-ar`. Runs under torchrun."""
    from mergevq_core import api

    precision = checked_precision(precision, device)
    if tokens is not None and tokens_sample:
        raise typer.BadParameter("use either --tokens or --tokens-sample")
    if views not in VIEW_MODES:
        raise typer.BadParameter(f"--views must be one of {', '.join(VIEW_MODES)}, got {views!r}")
    if crop_range is not None and crop_range != 1.0 and views == "center":
        raise typer.BadParameter("--crop-range with --views center would only shrink the image: use ten-crop or flip, or leave it out")

    class Bar(console.BarProgress):
        def start(self, stage: str, total: int, done: int = 0, **info) -> None:
            procs = f" on {info['processes']} processes" if info.get("processes", 1) > 1 else ""
            self.note(f"tokenizer {info['ckpt']}; {total:,} images × {info['views']} views, {total - done:,} still to "
                      f"encode{procs} → {info['out']}")
            super().start(stage, total, done)

    with Bar("img/s", quiet=json_) as bar:
        res = api.tokenize(data, out, ckpt=ckpt, tokens=tokens, tokens_sample=tokens_sample, views=views,
                           crop_range=crop_range, limit=limit, device=device, batch=batch, shard_size=shard_size,
                           workers=workers, seed=seed, precision=precision, progress=bar)
    if not console.is_main_process():
        return
    if json_:
        console.print_json(res.to_json())
        return
    console.kv("tokenized", [("shards", res.out), ("items", f"{res.items:,} × {res.views} views ({res.view_mode})"),
                             ("encoded now", f"{res.encoded:,}"), ("shards kept from before", res.skipped_shards),
                             ("K", res.tokens), ("precision", res.precision),
                             ("speed", f"{res.img_per_s:.1f} img/s ({res.views_per_s:.0f} views/s)")])
