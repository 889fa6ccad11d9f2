"""Source recovery fine-tuning (kind: recovery, paper appendix A.1 / Table A2): the tokenizer's source recovery
model trained again after stage 2, on token shards whose real ids are partly replaced by a trained RandAR's
teacher-forced predictions, so that it learns to place generated ids. Built from `mergevq tune-recovery`
options, saved in the run folder's config.json and checkpoints like the recipes, so `--resume` continues the
exact run.

Defaults are Table A2's: 5 epochs, AdamW (0.9, 0.95), weight decay 1e-2, batch 256. The table gives no learning
rate for this step; 1e-4 with a cosine decay is this implementation's choice (a fine-tuning rate: the model
starts from its stage-1 weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._checks import _check, _one_of
from .training import TrainLoopConfig

__all__ = ["CorruptionConfig", "RecoveryDataConfig", "RecoveryTrainConfig", "RecoveryTuneConfig"]

PREDICT_MODES = ("sample", "argmax")


@dataclass(frozen=True, kw_only=True)
class RecoveryTrainConfig(TrainLoopConfig):
    batch_size: int = 256
    micro_batch: int = 64
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-2
    schedule: str = "cosine"
    epochs: int = 5
    grad_clip: float = 1.0


@dataclass(frozen=True, kw_only=True)
class CorruptionConfig:
    """How the real ids of a training item are replaced by the generator's: each slot independently with
    probability `replace`, by the id RandAR predicts there in teacher forcing (a fresh random order per item, the
    true ids before it in that order, the item's class), drawn from its logits (`sample`, at `temperature`) or
    their argmax."""

    replace: float = 0.5
    predict: str = "sample"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check(0.0 <= self.replace <= 1.0, f"--replace {self.replace}: must be in [0, 1]")
        _one_of(self.predict, "--predict", PREDICT_MODES)
        _check(self.temperature > 0, f"--temperature {self.temperature}: must be > 0")


@dataclass(frozen=True, kw_only=True)
class RecoveryDataConfig:
    tokens: str = ""  # the token-shards folder (by default the one the generator was trained on)
    val_items: int = 512  # the last items, held out (by default the generator run's own held-out count)
    num_workers: int = 2

    def __post_init__(self) -> None:
        _check(self.val_items >= 1, f"--val-items {self.val_items}: must be >= 1")
        _check(self.num_workers >= 0, f"--workers {self.num_workers}: must be >= 0")


@dataclass(frozen=True, kw_only=True)
class RecoveryTuneConfig:
    kind: str = "recovery"
    generator: str = ""  # the RandAR checkpoint folder whose predictions corrupt the ids
    generator_hash: str = ""  # SHA-256 of its generator.safetensors: a resumed run checks it is the same
    tokenizer: str = ""  # the tokenizer checkpoint whose recovery model is tuned (frozen otherwise)
    tokenizer_hash: str = ""  # SHA-256 of its ema.safetensors (what shards and generators record)
    data: RecoveryDataConfig = field(default_factory=RecoveryDataConfig)
    corrupt: CorruptionConfig = field(default_factory=CorruptionConfig)
    train: RecoveryTrainConfig = field(default_factory=RecoveryTrainConfig)

    def __post_init__(self) -> None:
        _check(self.kind == "recovery", f"kind={self.kind!r}: a source recovery tuning config says kind: recovery")
