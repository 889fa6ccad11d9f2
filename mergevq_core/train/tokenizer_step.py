"""One stage-1 objective: every loss of paper Table A1 from one forward, so DDP sees every used parameter.

Generator total = w_rec·recon + w_perc·LPIPS + w_gan·adv (from gan_start) + w_ent·(H_sample − H_codebook)
                + w_commit·commit + w_src·CE(source) + w_align·align.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..losses import DinoCE, LPIPS, generator_adv_loss, kl_align, recon_loss
from ..models import MergeVQTokenizer


class TokenizerObjective(nn.Module):
    """Wraps the tokenizer (the only trainable part) with the frozen or separately-trained loss modules."""

    def __init__(self, tokenizer: MergeVQTokenizer, cfg: RunConfig, lpips: LPIPS | None, dino_ce: DinoCE | None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.lpips = lpips
        self.dino_ce = dino_ce

    def uses_align(self) -> bool:
        return self.cfg.loss.align_weight > 0 and self.tokenizer.align_head is not None and self.cfg.loss.align_teacher != "none"

    def uses_recovery(self) -> bool:
        return self.cfg.loss.source_weight > 0 and self.tokenizer.recovery is not None

    def forward(
        self, image: Tensor, tokens: int, student: Tensor | None = None, teacher_target: Tensor | None = None,
        disc: nn.Module | None = None,
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """image (B, 3, H, W); student (B, 3, h, w) and teacher_target (B, E) for alignment; disc when the
        adversarial term is on (its parameters get no gradient here). Returns (total, terms, reconstruction)."""
        lc = self.cfg.loss
        recon, enc = self.tokenizer(image, tokens=tokens, compute_entropy=lc.entropy_weight > 0)
        terms: dict[str, Tensor] = {"recon": recon_loss(recon.float(), image.float(), lc.recon)}
        total = lc.recon_weight * terms["recon"]
        if self.lpips is not None and lc.perceptual_weight > 0:
            terms["lpips"] = self.lpips(recon.float(), image.float())
            total = total + lc.perceptual_weight * terms["lpips"]
        terms["commit"] = enc.quant.commit_loss
        terms["entropy"] = enc.quant.entropy_loss
        total = total + lc.commit_weight * terms["commit"] + lc.entropy_weight * terms["entropy"]
        if self.uses_recovery():
            logits = self.tokenizer.recovery_logits(enc.quantized)
            terms["source_ce"] = self.tokenizer.recovery.loss(logits, enc.assign)
            with torch.no_grad():
                terms["source_acc"] = (logits.argmax(-1) == enc.assign).float().mean()
            total = total + lc.source_weight * terms["source_ce"]
        if self.uses_align() and student is not None and teacher_target is not None:
            feats = self.tokenizer.align_features(student, tokens).float()
            if self.dino_ce is not None:
                terms["align"] = self.dino_ce(feats, teacher_target.float())
            else:
                terms["align"] = kl_align(feats, teacher_target.float(), lc.align_temperature)
            total = total + lc.align_weight * terms["align"]
        if disc is not None:
            terms["g_adv"] = generator_adv_loss(disc(recon))
            total = total + lc.gan_weight * terms["g_adv"]
        terms["total"] = total
        return total, terms, recon
