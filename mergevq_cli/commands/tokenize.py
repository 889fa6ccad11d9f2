"""`mergevq tokenize`: encode a dataset once into token shards for stage-2 training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..options import DeviceOpt, JsonOpt

EXAMPLES = """
Examples:

  mergevq tokenize /data/imagenet/train --out tokens/gr-k144 --ckpt runs/gr-20261130-120000

  mergevq tokenize shapes --limit 20000 --out tokens/tiny --tokens-sample    # K drawn per image (MergeAR)

  mergevq tokenize /data/imagenet/train --out tokens/gr-k144                 # again: resumes, skipping finished shards
"""


def tokenize(
    data: Annotated[str, typer.Argument(help="An image folder (class subfolders give labels), or `shapes` / `photos`.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the shards and manifest.json.")],
    ckpt: Annotated[Optional[Path], typer.Option("--ckpt", help="Tokenizer run or checkpoint folder (default: the newest run).")] = None,
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
    bar = console.TrainProgress("img/s", ())
    state = {"t0": 0.0, "n": 0}

    def on_start(total: int, todo: int, path: Path) -> None:
        import time

        state["t0"] = time.perf_counter()
        if not json_:
            bar.note(f"tokenizer {path}; {total:,} images, {todo:,} still to encode → {out}")
            bar.start("tokenize", total, total - todo)

    def on_batch(n: int) -> None:
        import time

        state["n"] += n
        if bar.task is not None:
            bar.throughput(state["n"] / max(time.perf_counter() - state["t0"], 1e-9))
            bar.progress.update(bar.task, advance=n, rate=bar.rate)

    try:
        res = api.tokenize(data, out, ckpt, tokens, tokens_sample, limit, device, batch, shard_size, seed, on_start, on_batch)
    finally:
        if bar.task is not None:
            bar.stop()
    if json_:
        console.print_json(res)
        return
    console.kv("tokenized", [("shards", res["out"]), ("items", f"{res['items']:,}"), ("encoded now", f"{res['encoded']:,}"),
                             ("shards kept from before", res["skipped_shards"]), ("K", res["tokens"]),
                             ("speed", f"{res['img_per_s']:.1f} img/s")])
