"""Stage-1 tokenizer losses: reconstruction, LPIPS, adversarial (+LeCam) and global alignment."""

from .adversarial import LeCam, PatchDiscriminator, d_loss, generator_adv_loss, hinge_d_loss
from .distill import DinoCE, DinoV2Teacher, check_teacher, kl_align
from .perceptual import LPIPS, check_perceptual, default_vgg_path
from .recon import recon_loss

__all__ = [
    "recon_loss",
    "LPIPS",
    "default_vgg_path",
    "check_perceptual",
    "PatchDiscriminator",
    "hinge_d_loss",
    "LeCam",
    "generator_adv_loss",
    "d_loss",
    "kl_align",
    "DinoCE",
    "DinoV2Teacher",
    "check_teacher",
]
