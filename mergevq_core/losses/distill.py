"""Global semantic alignment of the student's cls token to a teacher (paper Eq. 10).

Teachers: a frozen local DINOv2 (`DinoV2Teacher`) or an EMA copy of the student (built by the trainer).
Losses: temperature-scaled KL (release) or DINO-style cross-entropy with a running teacher center.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LossConfig
from ..errors import CheckpointError, ConfigError

DINOV2_ARCH = "vit_base_patch14_dinov2"


def kl_align(student: Tensor, teacher: Tensor, temperature: float = 4.0) -> Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), summed over classes and averaged over the batch; (B, D) inputs.
    The teacher is detached."""
    t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


class DinoCE(nn.Module):
    """DINO cross-entropy (Caron et al. 2021): −Σ_k softmax((t − c)/τ_t)_k · log_softmax(s/τ_s)_k, batch mean.
    The head producing s and t must start with O(1) outputs (see `AlignHead`), else the teacher is uniform.

    `forward` is pure; call `update_center(teacher)` once per step after it (c ← m·c + (1−m)·mean_b t,
    the batch mean all-reduced across processes when torch.distributed is initialised).
    """

    center: Tensor

    def __init__(
        self, dim: int, teacher_temp: float = 0.04, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, dim))

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        t = F.softmax((teacher.detach().float() - self.center) / self.teacher_temp, dim=-1)
        log_s = F.log_softmax(student.float() / self.student_temp, dim=-1)
        return -(t * log_s).sum(-1).mean()

    @torch.no_grad()
    def update_center(self, teacher: Tensor) -> None:
        batch_center = teacher.detach().float().mean(0, keepdim=True)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            batch_center /= dist.get_world_size()
        m = self.center_momentum
        self.center.mul_(m).add_(batch_center, alpha=1 - m)


def _missing_teacher(path: Path | None) -> ConfigError:
    if path is None:
        return ConfigError(
            "alignment teacher weights not set (set loss.teacher_weights, or loss.align_teacher=ema|none)"
        )
    return ConfigError(
        f"alignment teacher weights not found: {path} (set loss.teacher_weights, or loss.align_teacher=ema|none)"
    )


def check_teacher(cfg: LossConfig) -> Path | None:
    """The DINOv2 file to load when the alignment term uses it, else None; raises ConfigError early when the
    file is unset or missing."""
    if cfg.align_teacher != "dinov2" or cfg.align_weight == 0:
        return None
    if not cfg.teacher_weights:
        raise _missing_teacher(None)
    path = Path(cfg.teacher_weights).expanduser()
    if not path.is_file():
        raise _missing_teacher(path)
    return path


class DinoV2Teacher(nn.Module):
    """Frozen timm DINOv2 from a local file (timm or facebookresearch layout; pos_embed resampled to img_size).

    (B, 3, 224, 224) ImageNet-normalised → (B, embed_dim) final-norm cls token (HF `pooler_output`).
    Extra keyword arguments go to `timm.create_model` (tests use them to build a tiny ViT).
    """

    def __init__(self, weights: str | Path, arch: str = DINOV2_ARCH, img_size: int = 224, **timm_kwargs: Any) -> None:
        super().__init__()
        path = Path(weights).expanduser()
        if not path.is_file():
            raise _missing_teacher(path)
        try:
            self.model = timm.create_model(
                arch,
                pretrained=True,
                pretrained_cfg_overlay=dict(file=str(path)),
                img_size=img_size,
                num_classes=0,
                **timm_kwargs,
            )
        except (RuntimeError, KeyError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"cannot load alignment teacher {path} as {arch}: {msg}") from None
        self.requires_grad_(False)
        self.eval()

    @property
    def dim(self) -> int:
        return int(self.model.num_features)

    def train(self, mode: bool = True) -> DinoV2Teacher:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x)[:, 0]
