"""Held-out evaluation of a tokenizer: PSNR per K, codebook usage, source-recovery accuracy, preview image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import MergeVQTokenizer
from .metrics import psnr, to_unit


@dataclass
class TokenizerEval:
    psnr_by_tokens: dict[int, float]  # mean held-out PSNR (dB) at each K
    codebook_usage: float  # distinct ids at the recipe's K / codebook size
    source_recovery_acc: float | None  # fraction of positions whose predicted slot is the true one, at the recipe's K
    images: int

    def to_json(self) -> dict:
        return {
            "psnr_by_tokens": {str(k): v for k, v in self.psnr_by_tokens.items()},
            "codebook_usage": self.codebook_usage,
            "source_recovery_acc": self.source_recovery_acc,
            "images": self.images,
        }


@torch.no_grad()
def evaluate_tokenizer(
    tok: MergeVQTokenizer, images: Tensor, tokens: tuple[int, ...], keep: int, batch: int = 64,
    autocast: torch.autocast | None = None,
) -> tuple[TokenizerEval, dict[int, Tensor]]:
    """images (M, 3, H, W) in [-1, 1] on the model's device. Returns the metrics and, per K, the
    reconstructions of the first 8 images (for the preview)."""
    was_training = tok.training
    tok.eval()
    sums = {k: 0.0 for k in tokens}
    seen: set[int] = set()
    hits, total = 0, 0
    previews: dict[int, Tensor] = {}
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        for k in tokens:
            with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
                enc = tok.encode(x, tokens=k)
                recon = tok.decode_codes(enc.quantized, enc.assign)
            sums[k] += float(psnr(recon, x).sum())
            if i == 0:
                previews[k] = recon[:8].float()
            if k == keep:
                seen.update(enc.ids.flatten().tolist())
                if tok.recovery is not None:
                    pred = tok.predict_assign(enc.ids)
                    hits += int((pred == enc.assign).sum())
                    total += enc.assign.numel()
    tok.train(was_training)
    result = TokenizerEval(
        psnr_by_tokens={k: sums[k] / len(images) for k in tokens},
        codebook_usage=len(seen) / tok.quantizer.codebook_size,
        source_recovery_acc=hits / total if total else None,
        images=len(images),
    )
    return result, previews


def save_preview(path: Path, originals: Tensor, recons: dict[int, Tensor], min_tile: int = 128) -> None:
    """Originals in the first row, one row of reconstructions per K below; small images are enlarged (nearest)."""
    from torchvision.utils import save_image

    rows = [originals[:8].float().cpu()] + [recons[k].cpu() for k in sorted(recons)]
    grid = torch.cat(rows)
    scale = max(1, min_tile // grid.shape[-1])
    if scale > 1:
        grid = F.interpolate(grid, scale_factor=scale, mode="nearest")
    tmp = path.with_name(f".{path.name}.tmp.png")
    save_image(to_unit(grid), tmp, nrow=len(rows[0]), padding=2, pad_value=1.0)
    tmp.replace(path)
