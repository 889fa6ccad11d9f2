"""Reconstruction of image files at one or several K, with per-image metrics and side-by-side pictures.

Each output PNG shows the original, the reconstruction and the merge map (the image tinted by the merged token
that holds each region, with the merge boundaries drawn), so a reader sees what K tokens kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..progress import SILENT, Progress

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.images import is_image_file, list_images, load_rgb
from ..errors import ConfigError, DataError
from ..models import MergeVQTokenizer
from .metrics import psnr, to_unit


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
    """(M, 3, size, size) in [-1, 1]: shorter side → size, centre crop (the paper's evaluation view).
    An unreadable file stops with its name (DataError)."""
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
    output: str
    lpips: float | None = None
    psnr_gt_source: float | None = None  # with --source predicted: PSNR when decoding with the true source

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class ReconResult:
    ckpt: str
    source: str
    out: str
    images: list[ReconRecord] = field(default_factory=list)
    mean: dict[int, dict[str, float]] = field(default_factory=dict)
    plot: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"ckpt": self.ckpt, "source": self.source, "out": self.out, "images": [r.to_json() for r in self.images],
                "mean": {str(k): v for k, v in self.mean.items()}, "plot": self.plot}


@torch.no_grad()
def reconstruct_images(
    tok: MergeVQTokenizer, files: list[Path], images: Tensor, tokens: list[int], source: str, out: Path,
    lpips: Callable[[Tensor, Tensor], Tensor] | None = None, batch: int = 16, progress: Progress = SILENT,
) -> tuple[list[ReconRecord], dict[int, Tensor], dict[int, set[int]]]:
    """Encode/decode every image at every K. Returns the records, the reconstructions per K (M, 3, H, W) on the
    CPU, and the distinct ids seen per K."""
    from .quality import ssim

    device = next(tok.parameters()).device
    grid = tok.cfg.model.grid
    records: list[ReconRecord] = []
    recons: dict[int, list[Tensor]] = {k: [] for k in tokens}
    seen: dict[int, set[int]] = {k: set() for k in tokens}
    names = _output_names(files)
    for start in range(0, len(images), batch):
        x = images[start : start + batch].to(device)
        for k in tokens:
            enc = tok.encode(x, tokens=k)
            seen[k].update(enc.ids.flatten().tolist())
            assign = tok.predict_assign(enc.ids) if source == "predicted" else enc.assign
            rec = tok.decode(enc.ids, assign).float().clamp(-1, 1)
            gt = tok.decode(enc.ids, enc.assign).float().clamp(-1, 1) if source == "predicted" else None
            p, s = psnr(rec, x).cpu(), ssim(rec.cpu(), x.cpu())
            lp = [float(lpips(rec[i : i + 1], x[i : i + 1])) for i in range(len(x))] if lpips is not None else None
            p_gt = psnr(gt, x).cpu() if gt is not None else None
            for i in range(len(x)):
                j = start + i
                target = out / f"{names[j]}_k{k}.png"
                save_triptych(target, x[i].cpu(), rec[i].cpu(), assign[i].cpu(), grid)
                records.append(ReconRecord(
                    path=str(files[j]), tokens=k, psnr=float(p[i]), ssim=float(s[i]), output=str(target),
                    lpips=lp[i] if lp is not None else None, psnr_gt_source=float(p_gt[i]) if p_gt is not None else None,
                ))
            recons[k].append(rec.cpu())
        progress.advance(len(x))
    return records, {k: torch.cat(v) for k, v in recons.items()}, seen


def _output_names(files: list[Path]) -> list[str]:
    """Unique, readable file stems for the outputs (parent folder added when stems repeat)."""
    stems = [f.stem for f in files]
    dup = {s for s in stems if stems.count(s) > 1}
    names = [f"{f.parent.name}_{f.stem}" if f.stem in dup else f.stem for f in files]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def summarise(records: list[ReconRecord], tokens: list[int]) -> dict[int, dict[str, float]]:
    mean: dict[int, dict[str, float]] = {}
    for k in tokens:
        rs = [r for r in records if r.tokens == k]
        m = {"psnr": sum(r.psnr for r in rs) / len(rs), "ssim": sum(r.ssim for r in rs) / len(rs)}
        if rs and rs[0].lpips is not None:
            m["lpips"] = sum(r.lpips for r in rs) / len(rs)
        if rs and rs[0].psnr_gt_source is not None:
            m["psnr_gt_source"] = sum(r.psnr_gt_source for r in rs) / len(rs)
            m["gap_db"] = m["psnr_gt_source"] - m["psnr"]
        mean[k] = m
    return mean


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


def reconstruct_files(
    tok: MergeVQTokenizer, ckpt: Path, files: list[Path], *, tokens: list[int] | None = None, source: str = "gt",
    out: str | Path = "recon", fid_weights: Path | None = None, batch: int = 16, progress: Progress = SILENT,
) -> ReconResult:
    """Reconstruct image `files` at each K in `tokens` (default: the checkpoint's merge.keep) and report per-image
    and mean PSNR / SSIM (LPIPS when VGG16 weights are found), codebook usage per K, rFID with `fid_weights`
    (Inception), and a quality-vs-K plot for a K list. `source`: `gt` (the encoder's own merge assignment) or
    `predicted` (the source recovery model's, from the ids alone)."""
    from .quality import lpips_if_available

    cfg = tok.cfg
    if source not in ("gt", "predicted"):
        raise ConfigError(f"--source {source!r}: choose gt or predicted")
    if batch < 1:
        raise ConfigError(f"--batch {batch}: must be >= 1")
    ks = sorted(set(tokens)) if tokens else [cfg.merge.keep]
    for k in ks:
        cfg.check_keep(k)
    if source == "predicted" and tok.recovery is None:
        raise ConfigError(f"--source predicted needs a source recovery model; {ckpt} was trained without one")
    if fid_weights is not None and len(files) < 2:
        raise ConfigError("--fid needs at least 2 images (give a folder)")
    images = load_images(files, cfg.model.image_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next(tok.parameters()).device
    lpips = lpips_if_available(cfg.loss.vgg_weights)
    lpips = lpips.to(device) if lpips is not None else None
    progress.start("reconstruct", len(files), ckpt=str(ckpt), tokens=ks)
    records, recons, seen = reconstruct_images(tok, files, images, ks, source, out, lpips, batch, progress)
    mean = summarise(records, ks)
    for k in ks:
        mean[k]["codebook_usage"] = len(seen[k]) / tok.quantizer.codebook_size
        if fid_weights is not None:
            from .fid import frechet_distance, to_uint8

            mean[k]["rfid"] = frechet_distance(to_uint8(images), to_uint8(recons[k]), fid_weights, device)
    res = ReconResult(ckpt=str(ckpt), source=source, out=str(out), images=records, mean=mean)
    if len(ks) > 1:
        res.plot = str(out / "quality_vs_tokens.png")
        plot_quality_vs_tokens(mean, Path(res.plot), f"{cfg.model.name} ({ckpt.parent.parent.name}), {len(files)} images")
    return res
