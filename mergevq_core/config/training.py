"""The training-loop fields and checks stage 1 (`TrainConfig`) and stage 2 (`ARTrainConfig`) share."""

from __future__ import annotations

from dataclasses import dataclass

from ._checks import _check, _one_of


@dataclass(frozen=True, kw_only=True)
class TrainLoopConfig:
    """Optimiser, schedule, precision, batch sizes and step counts; the defaults are stage 1's."""

    batch_size: int = 256  # global batch (all GPUs × accumulation)
    micro_batch: int = 16  # per GPU per step
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.9)
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    schedule: str = "step"  # step | cosine
    warmup_steps: int = 0
    lr_drops: tuple[float, ...] = ()  # step schedule: fractions of training where lr ×0.1
    epochs: int = 270
    max_steps: int | None = None
    grad_clip: float = 5.0
    # auto: bf16 autocast on CUDA, fp32 elsewhere (what bf16 meant before CPU autocast); bf16: autocast on CUDA and
    # CPU alike (slow on CPUs without native bf16); fp16: CUDA only, with a GradScaler; fp32: no autocast
    precision: str = "auto"
    seed: int = 0
    log_every: int = 50
    eval_every: int = 2000
    ckpt_every: int = 2000
    ckpt_minutes: float | None = None  # also checkpoint when this many minutes passed since the last one (None: off)
    keep_checkpoints: int = 2  # step folders kept in checkpoints/ (the newest, which `latest` points to, always)

    def __post_init__(self) -> None:
        _one_of(self.schedule, "train.schedule", ("step", "cosine"))
        _one_of(self.precision, "train.precision", ("auto", "bf16", "fp16", "fp32"))
        _one_of(self.optimizer, "train.optimizer", ("adamw",))
        _check(self.batch_size >= 1 and self.micro_batch >= 1, "train.batch_size and train.micro_batch must be >= 1")
        _check(self.lr > 0, "train.lr must be > 0")
        _check(all(0 < f <= 1 for f in self.lr_drops), "train.lr_drops are fractions in (0, 1]")
        for name in ("log_every", "eval_every", "ckpt_every", "epochs"):
            _check(getattr(self, name) >= 1, f"train.{name} must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps must be >= 1")
        _check(self.ckpt_minutes is None or self.ckpt_minutes > 0, "train.ckpt_minutes must be > 0")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
