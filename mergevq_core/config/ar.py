"""Stage 2 (kind: ar): the autoregressive generator over token shards. No model import here: the backbone's
size table and GPTConfig live in `models.gpt` (`gpt_config_from_recipe`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ._checks import _check, _one_of
from .training import TrainLoopConfig
from .version import CONFIG_VERSION

GENERATOR_NAMES = ("llamagen", "mergear", "randar")


@dataclass(frozen=True, kw_only=True)
class GPTModelConfig:
    size: str = "l"  # LlamaGen family preset for depth/dim/heads (models.gpt.GPT_SIZES: tiny | s | b | l | xl | xxl)
    depth: int | None = None  # None: from the size preset
    dim: int | None = None
    heads: int | None = None
    ffn_hidden: int | None = None  # None: LLaMA's round_up(8·dim/3, 256)
    vocab_size: int | None = None  # None: the token shards' codebook size
    n_tokens: int | None = None  # N grid positions; None: from the token shards
    num_classes: int | None = None  # None: from the token shards' labels
    factorized: tuple[int, ...] | None = None  # sub-token bits, LSB first; None: (6, 12) for 2^18, one head up to
    factor_depth: int = 2  # 2^14, else two halves. [] forces one head. factor_depth: intra-position blocks
    dropout: float = 0.1  # on the attention output and on the FFN output, once each (LlamaGen's resid/ffn dropout)
    token_dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("depth", "dim", "heads", "ffn_hidden", "vocab_size", "n_tokens", "num_classes"):
            v = getattr(self, name)
            _check(v is None or v >= 1, f"model.{name} must be >= 1")
        if self.n_tokens is not None:
            _check(math.isqrt(self.n_tokens) ** 2 == self.n_tokens, f"model.n_tokens={self.n_tokens} must be a square grid")
        _check(self.factor_depth >= 0, "model.factor_depth must be >= 0")
        for name in ("dropout", "token_dropout"):
            _check(0.0 <= getattr(self, name) < 1.0, f"model.{name} must be in [0, 1)")

    def sub_bits(self, vocab: int) -> tuple[int, ...]:
        """The factorisation used for a codebook of `vocab` ids."""
        if self.factorized is not None:
            return self.factorized
        bits = vocab.bit_length() - 1
        if vocab <= 2**14 or 2**bits != vocab:
            return ()
        return (6, 12) if bits == 18 else (bits // 2, bits - bits // 2)


@dataclass(frozen=True, kw_only=True)
class GeneratorConfig:
    name: str = "llamagen"  # llamagen | mergear | randar
    window: int | None = None  # mergear: Eq. 12 window w (positions seen besides representatives); None: grid + 1
    mask_groups: str = "id"  # mergear: representatives by first occurrence of the id, or of the source group
    tokens: int | None = None  # K at inference (mergear's M, randar's slots); None: most common K of the shards
    steps: int | None = None  # randar parallel decoding steps; None: 88 for 256 tokens, 64 for 144
    # Rotation of the position-free prefix tokens (class; MergeAR's M): identity (cos 1, sin 0), or zero (cos = sin
    # = 0, LlamaGen's and the release's freqs_cis rows for the class slot, which zero the prefix's q and k: every
    # query gives it logit 0 and it attends uniformly; RandAR keeps this). The recipes use identity: the class
    # token's keys then carry its content, and the checkpoints trained so far use it.
    prefix_rope: str = "identity"

    def __post_init__(self) -> None:
        _one_of(self.name, "generator.name", GENERATOR_NAMES)
        _one_of(self.prefix_rope, "generator.prefix_rope", ("identity", "zero"))
        _one_of(self.mask_groups, "generator.mask_groups", ("id", "source"))
        _check(self.window is None or self.window >= 1, "generator.window must be >= 1")
        if self.tokens is not None:
            _check(self.tokens >= 1 and math.isqrt(self.tokens) ** 2 == self.tokens, "generator.tokens must be a square")
        _check(self.steps is None or self.steps >= 1, "generator.steps must be >= 1")


@dataclass(frozen=True, kw_only=True)
class ARDataConfig:
    tokens: str | None = None  # token-shards folder from `mergevq tokenize` (or `train-ar --shards DIR`)
    val_items: int = 512  # items held out (the last ones) for the validation loss
    num_workers: int = 2

    def __post_init__(self) -> None:
        _check(self.val_items >= 1, "data.val_items must be >= 1")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ARTrainConfig(TrainLoopConfig):
    """Stage-2 training: the shared loop with LlamaGen's defaults, plus label dropout, smoothing and `init`."""

    micro_batch: int = 32
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05  # matrices and embeddings only (never norms)
    schedule: str = "cosine"  # step | cosine
    epochs: int = 300
    grad_clip: float = 1.0
    label_drop: float = 0.1  # class → null class, for classifier-free guidance
    label_smoothing: float = 0.0
    init: str | None = None  # a generator run or checkpoint whose weights start a new run (fresh optimizer)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0.0 <= self.label_drop < 1.0, "train.label_drop must be in [0, 1)")
        _check(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class ARRunConfig:
    kind: Literal["ar"] = "ar"
    version: int = CONFIG_VERSION  # config version (config/version.py); older saved configs are upgraded on load
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    model: GPTModelConfig = field(default_factory=GPTModelConfig)
    data: ARDataConfig = field(default_factory=ARDataConfig)
    train: ARTrainConfig = field(default_factory=ARTrainConfig)

    def __post_init__(self) -> None:
        _check(self.version == CONFIG_VERSION,
               f"version={self.version}: older configs are built through config_from_dict / config_from_saved")

    def generator_options(self, default_tokens: int | None = None) -> dict[str, Any]:
        """Keyword options of the registered generator class."""
        g = self.generator
        common = {"prefix_rope": g.prefix_rope}
        if g.name == "mergear":
            return {**common, "window": g.window, "mask_groups": g.mask_groups,
                    "default_tokens": g.tokens or default_tokens}
        if g.name == "randar":
            return {**common, "default_tokens": g.tokens or default_tokens}
        return common
