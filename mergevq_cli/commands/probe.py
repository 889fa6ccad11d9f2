"""`mergevq probe`: linear probing of the frozen tokenizer encoder against a raw-pixel baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import console
from ..options import DeviceOpt, JsonOpt, TokenizerOpt

EXAMPLES = """
Examples:

  mergevq probe shapes                          # newest tokenizer run, all tokens (no merging), as the paper

  mergevq probe shapes --tokens 9 --json        # after merging to 9 tokens (the R-style setting)

  mergevq probe /data/imagenet-subset --ckpt runs/gr-... --epochs 90 --train 50000 --test 10000
"""


def probe(
    data: Annotated[str, typer.Argument(help="`shapes`, or a folder with one subfolder per class.", show_default=False)],
    ckpt: TokenizerOpt = None,
    tokens: Annotated[str, typer.Option("--tokens", "-k", help="`all` (no merging) or K merged tokens.")] = "all",
    epochs: Annotated[int, typer.Option("--epochs", help="Probe training epochs (paper: 90).")] = 90,
    lr: Annotated[float, typer.Option("--lr", help="AdamW learning rate (cosine schedule).")] = 1e-3,
    n_train: Annotated[int, typer.Option("--train", help="Training images (shapes: generated; folder: at most).")] = 5000,
    n_test: Annotated[int, typer.Option("--test", help="Test images.")] = 1000,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the confusion-matrix PNG.")] = Path("probe"),
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Linear probe (BN + linear, AdamW, cosine) on frozen encoder features; reports top-1 and a pixel baseline."""
    from mergevq_core import api

    with console.BarProgress("img/s", quiet=json_) as bar:
        res = api.probe(data, ckpt=ckpt, tokens=tokens, epochs=epochs, lr=lr, n_train=n_train, n_test=n_test, out=out,
                        seed=seed, device=device, progress=bar)
    if json_:
        console.print_json(res.to_json())
        return
    console.kv(f"linear probe ({res.data})", [
        ("tokenizer", res.ckpt), ("tokens", f"{res.tokens}" + (" (all, no merging)" if tokens == "all" else "")),
        ("split", f"{res.n_train:,} train / {res.n_test:,} test, {len(res.classes)} classes, {res.epochs} epochs"),
        ("top-1", f"{res.top1:.3f} (features {res.feature_dim}-d)"), ("raw-pixel baseline", f"{res.baseline_top1:.3f}"),
        ("confusion matrix", res.confusion_png), ("time", f"{res.wall_s:.1f} s"),
    ])
