"""`mergevq evaluate`: gFID, Inception Score and precision / recall of generated samples, streamed in batches."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..options import DeviceOpt, JsonOpt

EXAMPLES = """
Examples:

  mergevq evaluate samples/mergear/samples.npz --ref shapes       # as many `shapes` images

  mergevq evaluate --ref /data/imagenet/train --size 256 --save-stats in256.npz   # once

  mergevq evaluate samples.npz --ref in256.npz --inception-weights weights-inception-2015-12-05-6726825d.pth

  mergevq evaluate samples.npz --ref VIRTUAL_imagenet256_labeled.npz --json    # ADM's batch

  torchrun --nproc-per-node 8 -m mergevq_cli evaluate samples.npz --ref in256.npz
"""


def evaluate(
    samples: Annotated[Optional[str], typer.Argument(
        help="Samples: an .npz of uint8 (N, H, W, 3) images (`arr_0` or `images`) or a folder of images.",
        show_default=False)] = None,
    ref: Annotated[str, typer.Option("--ref", help="Reference: a folder of real images, `shapes`, or an .npz with "
                                     "mu / sigma (and features), or ADM's reference batch.", show_default=False)] = ...,
    save_stats: Annotated[Optional[Path], typer.Option("--save-stats", help="Also save the reference's statistics "
                                                       "(mu, sigma, features) to this .npz.")] = None,
    inception_weights: Annotated[Optional[str], typer.Option("--inception-weights", help="Inception weights file "
                                                             "(default: resolved offline).")] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per Inception batch.")] = 64,
    size: Annotated[Optional[int], typer.Option("--size", min=1, help="Side folder images are resized to (default: "
                                                "the samples').")] = None,
    count: Annotated[Optional[int], typer.Option("--count", min=2, help="`shapes` reference images (default: as "
                                                 "many as samples).")] = None,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Image-decoding workers for folders.")] = 0,
    no_pr: Annotated[bool, typer.Option("--no-pr", help="Skip precision / recall (keeps no features).")] = False,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Score samples against a reference (gFID, IS, precision / recall), or save a reference's statistics once."""
    from mergevq_core import api

    with console.BarProgress("img/s", quiet=json_) as bar:
        res = api.evaluate(samples, ref, save_stats=save_stats, inception_weights=inception_weights, batch=batch,
                           size=size, count=count, precision_recall=not no_pr, workers=workers, device=device,
                           progress=bar)
    if not console.is_main_process():
        return
    if json_:
        console.print_json(res.to_json())
        return
    isc = res.inception_score or {}
    pr = "-" if res.precision is None else f"{res.precision:.4f} / {res.recall:.4f} (k = {res.neighbourhood})"
    rows = [("samples", f"{res.samples_path} ({res.samples:,} images)"), ("gFID", f"{res.fid:.4f}"),
            ("IS", f"{isc['mean']:.3f} ± {isc['std']:.3f}" if isc.get("available") else f"- ({isc.get('reason')})"),
            ("precision / recall", pr)] if res.samples_path else []
    images = "" if res.reference_images is None else f" ({res.reference_images:,} images)"
    console.kv("evaluate", rows + [("reference", res.reference + images), ("saved statistics", res.saved_stats or "-"),
                                   ("weights", res.weights), ("time", f"{res.wall_s:.1f} s")]
               + [("note", n) for n in res.notes])
