"""Reconstruction of image files at one or several K, with per-image metrics and side-by-side pictures.

Each output PNG shows the original, the reconstruction and the merge map (the image tinted by the merged token
that holds each region, with the merge boundaries drawn), so a reader sees what K tokens kept. Pictures are made
for the first `save` images; the per-image metrics of every image go to `per_image.jsonl`. The pass itself
streams (`eval.recon_stream`): memory stays flat in the number of images, and torchrun ranks split the files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..progress import SILENT, Progress

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.images import is_image_file, list_images, load_rgb
from ..dist import DistInfo
from ..errors import ConfigError, DataError
from ..models import MergeVQTokenizer
from .metrics import to_unit

DEFAULT_SAVE = 32  # triptychs per K unless --save N / --save-all


def collect_images(paths: list[Path]) -> list[Path]:
    """Image files named directly or found (recursively) in folders; a missing path is an error."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = list_images(p)[0]
            files.extend(found)
        elif p.is_file():
            if not is_image_file(p):
                raise DataError(f"not an image file: {p}")
            files.append(p)
        else:
            raise DataError(f"no such file or folder: {p}")
    if not files:
        raise DataError("no images to reconstruct: give image files or folders (or --photos)")
    return files


def load_images(files: list[Path], size: int) -> Tensor:
    """(M, 3, size, size) in [-1, 1]: shorter side → size, centre crop (the paper's evaluation view), all in
    memory (a few images; `reconstruct_files` streams instead). An unreadable file stops with its name (DataError)."""
    from ..data.views import recon_view

    g = torch.Generator()
    return torch.stack([recon_view(load_rgb(f), size, g, train=False) for f in files])


def slot_colours(k: int, seed: int = 0) -> Tensor:
    """(K, 3) distinct colours in [0, 1] (golden-ratio hues, alternating lightness)."""
    import colorsys

    out = []
    for i in range(k):
        h = (seed * 0.13 + i * 0.618033988749895) % 1.0
        out.append(colorsys.hls_to_rgb(h, 0.55 if i % 2 else 0.45, 0.85))
    return torch.tensor(out)


def merge_map(image: Tensor, assign: Tensor, grid: int) -> Tensor:
    """Tint `image` (3, H, W) in [-1, 1] by the slot holding each region; assign (N,) over a grid×grid raster.
    Boundaries between merged tokens are drawn dark. Returns (3, H, W) in [0, 1]."""
    h, w = image.shape[-2:]
    k = int(assign.max()) + 1
    slots = assign.view(1, 1, grid, grid).float()
    up = F.interpolate(slots, size=(h, w), mode="nearest")[0, 0].long()  # (H, W) slot per pixel
    tint = slot_colours(k)[up].permute(2, 0, 1)  # (3, H, W)
    out = 0.6 * to_unit(image) + 0.4 * tint
    edge = torch.zeros(h, w, dtype=torch.bool)
    edge[:, 1:] |= up[:, 1:] != up[:, :-1]
    edge[1:, :] |= up[1:, :] != up[:-1, :]
    return torch.where(edge, out * 0.25, out)


def save_triptych(path: Path, original: Tensor, recon: Tensor, assign: Tensor, grid: int, min_side: int = 256) -> None:
    """original | reconstruction | merge map, enlarged (nearest) when small."""
    from torchvision.utils import save_image

    panels = torch.stack([to_unit(original), to_unit(recon), merge_map(original, assign, grid)])
    scale = max(1, math.ceil(min_side / panels.shape[-1]))
    if scale > 1:
        panels = F.interpolate(panels, scale_factor=scale, mode="nearest")
    save_image(panels, path, nrow=3, padding=4, pad_value=1.0)


@dataclass
class ReconRecord:
    path: str
    tokens: int
    psnr: float
    ssim: float
    output: str | None = None  # the triptych, for the saved images
    lpips: float | None = None
    psnr_gt_source: float | None = None  # with --source predicted: PSNR when decoding with the true source

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class ReconResult:
    """`images`: the records of the saved images only (all of them: `per_image`, one JSON row per image and K);
    `count`: images evaluated; `fid_reference_cached`: the originals' Inception statistics came from the cache
    (None without rFID)."""

    ckpt: str
    source: str
    out: str
    images: list[ReconRecord] = field(default_factory=list)
    mean: dict[int, dict[str, float]] = field(default_factory=dict)
    plot: str | None = None
    count: int = 0
    per_image: str | None = None
    fid_reference_cached: bool | None = None
    precision: str = "fp32"

    def to_json(self) -> dict[str, Any]:
        return {"ckpt": self.ckpt, "source": self.source, "precision": self.precision, "out": self.out,
                "count": self.count, "images": [r.to_json() for r in self.images],
                "mean": {str(k): v for k, v in self.mean.items()},
                "per_image": self.per_image, "fid_reference_cached": self.fid_reference_cached, "plot": self.plot}


def _output_names(files: list[Path]) -> list[str]:
    """Unique, readable file stems for the outputs (parent folder added when stems repeat)."""
    from collections import Counter

    stems = Counter(f.stem for f in files)
    names = [f"{f.parent.name}_{f.stem}" if stems[f.stem] > 1 else f.stem for f in files]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def plot_quality_vs_tokens(mean: dict[int, dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(mean)
    fig, axes = plt.subplots(1, 3 if "rfid" in mean[ks[0]] else 2, figsize=(10, 3.4), dpi=110)
    for ax, key, label in zip(axes, ("psnr", "ssim", "rfid"), ("PSNR (dB)", "SSIM", "rFID")):
        ax.plot(ks, [mean[k][key] for k in ks], "o-")
        if "psnr_gt_source" in mean[ks[0]] and key == "psnr":
            ax.plot(ks, [mean[k]["psnr_gt_source"] for k in ks], "s--", label="true source")
            ax.legend(fontsize=7)
        ax.set(xlabel="tokens kept K", ylabel=label)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _check_options(source: str, batch: int, workers: int, save: int | None, save_all: bool) -> None:
    if source not in ("gt", "predicted"):
        raise ConfigError(f"--source {source!r}: choose gt or predicted")
    if batch < 1:
        raise ConfigError(f"--batch {batch}: must be >= 1")
    if workers < 0:
        raise ConfigError(f"--workers {workers}: must be >= 0 (0: decode in the main process)")
    if save is not None and save_all:
        raise ConfigError("give either --save N or --save-all, not both")
    if save is not None and save < 0:
        raise ConfigError(f"--save {save}: must be >= 0 (0: no pictures)")


def reconstruct_files(
    tok: MergeVQTokenizer, ckpt: Path, files: list[Path], *, tokens: list[int] | None = None, source: str = "gt",
    out: str | Path = "recon", fid_weights: Path | None = None, batch: int = 16, workers: int = 0,
    save: int | None = None, save_all: bool = False, cache: str | Path | None = None, dist: DistInfo | None = None,
    progress: Progress = SILENT, precision: str = "fp32",
) -> ReconResult:
    """Reconstruct image `files` at each K in `tokens` (default: the checkpoint's merge.keep) and report per-image
    (`out/per_image.jsonl`) and mean PSNR / SSIM (LPIPS when VGG16 weights are found), codebook usage per K, rFID
    with `fid_weights` (Inception; the originals' statistics cached under `cache`), triptychs of the first `save`
    images (default 32; `save_all`: every image) and a quality-vs-K plot for a K list. `source`: `gt` (the
    encoder's own merge assignment) or `predicted` (the source recovery model's, from the ids alone). `workers`:
    DataLoader processes decoding the files. `precision`: fp32, or bf16 autocast around encode / decode. Under
    torchrun (`dist`) the ranks split the files; every rank returns the same result and only rank 0 writes the
    summary files."""
    from ..precision import check_precision
    from .quality import lpips_if_available
    from .recon_stream import stream_reconstruct

    cfg = tok.cfg
    _check_options(source, batch, workers, save, save_all)
    precision = check_precision(precision)
    ks = sorted(set(tokens)) if tokens else [cfg.merge.keep]
    for k in ks:
        cfg.check_keep(k)
    if source == "predicted" and tok.recovery is None:
        raise ConfigError(f"--source predicted needs a source recovery model; {ckpt} was trained without one")
    if fid_weights is not None and len(files) < 2:
        raise ConfigError("--fid needs at least 2 images (give a folder)")
    n_save = len(files) if save_all else (DEFAULT_SAVE if save is None else save)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(tok.parameters()).device
    lpips = lpips_if_available(cfg.loss.vgg_weights)
    lpips = lpips.to(device) if lpips is not None else None
    st = stream_reconstruct(tok, files, ks, source, out, names=_output_names(files), lpips=lpips, batch=batch,
                            workers=workers, save=n_save, fid_weights=fid_weights, cache=cache, dist=dist,
                            progress=progress, precision=precision, ckpt=str(ckpt))
    res = ReconResult(ckpt=str(ckpt), source=source, out=str(out), images=st.records, mean=st.mean, count=st.count,
                      per_image=str(st.per_image), fid_reference_cached=st.fid_reference_cached, precision=precision)
    if len(ks) > 1:
        res.plot = str(out / "quality_vs_tokens.png")
        if dist is None or dist.is_main:
            title = f"{cfg.model.name} ({ckpt.parent.parent.name}), {st.count} images"
            plot_quality_vs_tokens(st.mean, Path(res.plot), title)
    return res
