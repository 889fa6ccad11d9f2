"""`mergevq tokenize`: encode a dataset once into token shards for stage-2 training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..options import DeviceOpt, JsonOpt, TokenizerOpt

EXAMPLES = """
Examples:

  mergevq tokenize /data/imagenet/train --out tokens/gr-k144 --ckpt runs/gr-20261130-120000

  mergevq tokenize shapes --limit 20000 --out tokens/tiny --tokens-sample    # K drawn per image (MergeAR)

  mergevq tokenize /data/imagenet/train --out tokens/gr-k144                 # again: resumes, skipping finished shards
"""


def tokenize(
    data: Annotated[str, typer.Argument(help="An image folder (class subfolders give labels), or `shapes` / `photos`.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the shards and manifest.json.")],
    ckpt: TokenizerOpt = None,
    tokens: Annotated[Optional[int], typer.Option("--tokens", "-k", help="Keep K tokens per image (default: the recipe's merge.keep).")] = None,
    tokens_sample: Annotated[bool, typer.Option("--tokens-sample", help="Draw K per image with the recipe's keep-count sampler.")] = False,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Encode only the first N items (shapes: how many to generate, default 10000).")] = None,
    batch: Annotated[int, typer.Option("--batch", help="Images per forward pass.")] = 64,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Images per shard file.")] = 4096,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the shapes data and --tokens-sample.")] = 0,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Encode DATA into token shards (ids, assign, K, label) for `mergevq train-ar`."""
    from mergevq_core import api

    if tokens is not None and tokens_sample:
        raise typer.BadParameter("use either --tokens or --tokens-sample")

    class Bar(console.BarProgress):
        def start(self, stage: str, total: int, done: int = 0, **info) -> None:
            self.note(f"tokenizer {info['ckpt']}; {total:,} images, {total - done:,} still to encode → {info['out']}")
            super().start(stage, total, done)

    with Bar("img/s", quiet=json_) as bar:
        res = api.tokenize(data, out, ckpt=ckpt, tokens=tokens, tokens_sample=tokens_sample, limit=limit, device=device,
                           batch=batch, shard_size=shard_size, seed=seed, progress=bar)
    if json_:
        console.print_json(res.to_json())
        return
    console.kv("tokenized", [("shards", res.out), ("items", f"{res.items:,}"), ("encoded now", f"{res.encoded:,}"),
                             ("shards kept from before", res.skipped_shards), ("K", res.tokens),
                             ("speed", f"{res.img_per_s:.1f} img/s")])
