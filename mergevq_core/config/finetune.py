"""The end-to-end fine-tuning protocol (paper A.4, after SimMIM / MAE): the tokenizer's encoder plus a head,
trained on a labelled split. Built from `mergevq probe --protocol finetune` options, saved in the run folder's
config.json and checkpoints like the training recipes, so `--resume` continues the exact run.

Defaults are the ViT-B recipe those papers use for 100 epochs at batch 1024: AdamW (0.9, 0.999), lr 5e-4 ×
batch / 256, weight decay 0.05, layer-wise lr decay 0.65, 5 warm-up epochs then cosine, RandAugment
rand-m9-mstd0.5-inc1 (magnitude capped at 9, see `randaug`), mixup 0.8 / cutmix 1.0, label smoothing 0.1, random erasing 0.25, drop path 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._checks import _check
from .training import TrainLoopConfig

__all__ = ["FinetuneAugConfig", "FinetuneConfig", "FinetuneDataConfig", "FinetuneTrainConfig"]


@dataclass(frozen=True, kw_only=True)
class FinetuneTrainConfig(TrainLoopConfig):
    batch_size: int = 1024
    micro_batch: int = 128
    lr: float = 2e-3  # 5e-4 × 1024 / 256
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05
    schedule: str = "cosine"
    epochs: int = 100
    warmup_epochs: float = 5.0  # turned into warmup_steps once the data size is known
    layer_decay: float = 0.65
    drop_path: float = 0.1
    grad_clip: float = 0.0  # off, as MAE's fine-tuning

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 < self.layer_decay <= 1, f"--layer-decay {self.layer_decay}: must be in (0, 1]")
        _check(0 <= self.drop_path < 1, f"--drop-path {self.drop_path}: must be in [0, 1)")
        _check(self.warmup_epochs >= 0, f"--warmup-epochs {self.warmup_epochs}: must be >= 0")


@dataclass(frozen=True, kw_only=True)
class FinetuneAugConfig:
    # timm's auto_augment string ("none" turns it off). The papers' rand-m9-mstd0.5-inc1 with the magnitude capped
    # at 9 (mmax9): at 10, timm's PosterizeIncreasing asks Pillow for 0 bits, which Pillow 13 refuses.
    randaug: str = "rand-m9-mstd0.5-inc1-mmax9"
    mixup: float = 0.8  # Beta(α, α); 0 turns it off
    cutmix: float = 1.0
    smoothing: float = 0.1
    reprob: float = 0.25  # random erasing
    scale_min: float = 0.08  # RandomResizedCrop's smallest area fraction

    def __post_init__(self) -> None:
        _check(self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix must be >= 0")
        _check(0 <= self.smoothing < 1, f"--smoothing {self.smoothing}: must be in [0, 1)")
        _check(0 <= self.reprob <= 1, f"--reprob {self.reprob}: must be in [0, 1]")
        _check(0 < self.scale_min <= 1, f"--scale-min {self.scale_min}: must be in (0, 1]")


@dataclass(frozen=True, kw_only=True)
class FinetuneDataConfig:
    train: str = "shapes"  # `shapes` or a folder of class subfolders
    val: str | None = None  # a folder of class subfolders (None: shapes' val stream, or a split of `train`)
    n_train: int | None = None
    n_val: int | None = None
    num_workers: int = 8


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    kind: str = "finetune"
    tokenizer: str = ""  # the tokenizer checkpoint folder the encoder starts from
    tokenizer_hash: str = ""  # cache.checkpoint_hash of it: a resumed run checks it is the same
    tokens: int = 0  # K the encoder merges to (N: all tokens, no merging, as the paper's Table 1)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    aug: FinetuneAugConfig = field(default_factory=FinetuneAugConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)

    def __post_init__(self) -> None:
        _check(self.kind == "finetune", f"kind={self.kind!r}: a fine-tuning config says kind: finetune")
        _check(self.tokens >= 1, "tokens must be >= 1")
