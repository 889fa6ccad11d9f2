"""PatchGAN discriminator, hinge loss, LeCam regulariser and the generator's adversarial loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """pix2pix / taming NLayerDiscriminator: a 70×70-receptive-field PatchGAN.

    (B, in_ch, H, W) → (B, 1, H', W') logits; with n_layers=3, H' = H/8 - 2 (30 at 256 px).
    """

    def __init__(self, in_ch: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, 4, 1, 1),
        ]
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 · (E[relu(1 − D(x))] + E[relu(1 + D(x̂))]), in float32 whatever the logits' dtype."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_adv_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating loss, per sample on the mean logit: mean_b softplus(−mean_{hw} D(x̂)_b) (release); float32."""
    return F.softplus(-logits_fake.float().flatten(1).mean(1)).mean()


class LeCam(nn.Module):
    """LeCam regulariser (Yu et al., CVPR 2021) with EMA anchors of the mean real / fake logits.

    R = E[relu(D(x) − α_fake)²] + E[relu(α_real − D(x̂))²]; call `update` first (release order).
    The anchors are buffers, so they are saved and restored with the state dict.
    """

    ema_real: Tensor
    ema_fake: Tensor
    decay: Tensor

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))
        self.register_buffer("decay", torch.tensor(float(decay)))

    @torch.no_grad()
    def update(self, logits_real: Tensor, logits_fake: Tensor) -> None:
        """Under torch.distributed the means are of the global batch, so every rank holds the same anchors (rank 0
        saves them, and a resumed rank 1 must continue from what it had)."""
        d = self.decay
        means = torch.stack([logits_real.detach().float().mean(), logits_fake.detach().float().mean()])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(means)  # a sum: gloo has no average
            means /= torch.distributed.get_world_size()
        self.ema_real.copy_(d * self.ema_real + (1 - d) * means[0])
        self.ema_fake.copy_(d * self.ema_fake + (1 - d) * means[1])

    def forward(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        reg_real = F.relu(logits_real.float() - self.ema_fake).pow(2).mean()
        reg_fake = F.relu(self.ema_real - logits_fake.float()).pow(2).mean()
        return reg_real + reg_fake


def d_loss(
    disc: nn.Module, lecam: LeCam | None, x_real: Tensor, x_fake: Tensor, lecam_weight: float, weight: float = 1.0
) -> tuple[Tensor, dict[str, float]]:
    """Discriminator step loss: weight · (hinge + lecam_weight · LeCam), with D run separately on real and detached
    fake (separate BatchNorm statistics, as in taming). `weight` is `loss.disc_weight` (paper Table A1
    "discriminator loss 0.8"). Updates the LeCam anchors in place; the logged terms are unweighted."""
    logits_real = disc(x_real.detach())
    logits_fake = disc(x_fake.detach())
    hinge = hinge_d_loss(logits_real, logits_fake)
    loss = hinge
    reg = torch.zeros((), device=hinge.device)
    if lecam is not None:
        lecam.update(logits_real, logits_fake)
        reg = lecam(logits_real, logits_fake)
        if lecam_weight > 0:
            loss = hinge + lecam_weight * reg
    if weight != 1.0:
        loss = weight * loss
    logs = {
        "d_hinge": hinge.item(),
        "lecam": reg.item(),
        "logits_real": logits_real.detach().float().mean().item(),
        "logits_fake": logits_fake.detach().float().mean().item(),
    }
    return loss, logs
