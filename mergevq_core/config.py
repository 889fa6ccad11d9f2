"""One strict tree of frozen dataclasses, loaded from flat YAML recipes.

`load_config(path, overrides)` reads YAML with `yaml.safe_load`, applies `--set a.b.c=value` pairs to the
raw mapping, then builds the dataclasses recursively. Unknown keys fail with the closest valid key;
cross-field checks live in `__post_init__` so every way of building a config is validated.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _one_of(value: str, name: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name}={value!r}: choose one of {', '.join(choices)}")


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    kind: str = "hybrid"  # hybrid: MAGVIT-v2 CNN stages then ToMe ViT (G, G+R); vit: patchify + ToMe ViT (R)
    ch: int = 64  # hybrid: base channels of the CNN stages
    ch_mult: tuple[int, ...] = (1, 2, 4, 8)  # hybrid: one entry per stage; len-1 stride-2 downsamplings
    num_res_blocks: int = 4  # hybrid: ResBlocks per stage
    patch_size: int = 16  # vit: patchify stride
    dim: int = 512  # transformer width; hybrid requires ch * ch_mult[-1]
    depth: int = 12  # ToMe blocks; merging happens in every block, starting at block 0
    heads: int = 8
    mlp_ratio: float = 4.0
    layer_scale: float = 1e-5
    init: str = "random"  # random | dinov2 (weight selection from dinov2_weights, paper A.1)
    dinov2_weights: str | None = None  # local timm-format DINOv2 state dict (.safetensors / .pth)
    # none: the tokens carry no absolute position (release). sincos: a fixed 2D sin-cos embedding is added to the
    # stem's tokens, so the merged codes can say where their groups lie and source recovery can predict `assign`.
    pos_embed: str = "none"

    def __post_init__(self) -> None:
        _one_of(self.kind, "model.encoder.kind", ("hybrid", "vit"))
        _one_of(self.init, "model.encoder.init", ("random", "dinov2"))
        _one_of(self.pos_embed, "model.encoder.pos_embed", ("none", "sincos"))
        _check(self.dim % self.heads == 0, f"model.encoder.dim={self.dim} is not divisible by heads={self.heads}")
        _check(self.depth >= 1, "model.encoder.depth must be >= 1")
        if self.kind == "hybrid":
            _check(len(self.ch_mult) >= 1, "model.encoder.ch_mult must not be empty")
            _check(
                self.dim == self.ch * self.ch_mult[-1],
                f"model.encoder.dim={self.dim} must equal ch*ch_mult[-1]={self.ch * self.ch_mult[-1]} for a hybrid encoder",
            )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1) if self.kind == "hybrid" else self.patch_size


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 4, 8)  # levels bottom→top; len-1 depth-to-space ×2 upsamplings
    num_res_blocks: int = 4  # level 0 gets this many ResBlocks, the others one more (release)
    dim: int = 512  # transformer width; must equal ch * ch_mult[-1]
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    layer_scale: float = 1e-5

    def __post_init__(self) -> None:
        _check(self.dim == self.ch * self.ch_mult[-1], f"model.decoder.dim={self.dim} must equal ch*ch_mult[-1]")
        _check(self.dim % self.heads == 0, f"model.decoder.dim={self.dim} is not divisible by heads={self.heads}")
        _check(self.depth >= 0 and self.num_res_blocks >= 1, "model.decoder depth >= 0 and num_res_blocks >= 1")


@dataclass(frozen=True, kw_only=True)
class RecoveryConfig:
    enabled: bool = True  # paper Eq. 8-9; the release ships it disabled and untrained
    dim: int = 384
    depth: int = 2
    heads: int = 8
    mlp_ratio: float = 4.0
    self_attn: bool = True  # paper: query self-attention in each block; the release has cross-attention only

    def __post_init__(self) -> None:
        _check(self.dim % self.heads == 0, f"model.recovery.dim={self.dim} is not divisible by heads={self.heads}")


@dataclass(frozen=True, kw_only=True)
class AlignHeadConfig:
    kind: str = "layer3"  # none | layer2 (Linear-GELU-LN-Linear, release G) | layer3 (3 Linear, release G+R/R)
    out_dim: int = 768  # teacher width (DINOv2-B)

    def __post_init__(self) -> None:
        _one_of(self.kind, "model.align_head.kind", ("none", "layer2", "layer3"))


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "mergevq-g"  # preset the other fields start from: mergevq-g | mergevq-gr | mergevq-r
    image_size: int = 256
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    align_head: AlignHeadConfig = field(default_factory=AlignHeadConfig)

    def __post_init__(self) -> None:
        ds = self.encoder.downsample
        _check(
            self.image_size % ds == 0,
            f"model.image_size={self.image_size} is not divisible by the encoder downsampling {ds}",
        )
        up = 2 ** (len(self.decoder.ch_mult) - 1)
        _check(
            up == ds,
            f"model.decoder upsamples x{up} but the encoder downsamples x{ds}: set model.decoder.ch_mult to "
            f"{len(self.encoder.ch_mult) if self.encoder.kind == 'hybrid' else int(math.log2(ds)) + 1} levels",
        )

    @property
    def grid(self) -> int:
        """Side of the token grid before merging: N = grid**2."""
        return self.image_size // self.encoder.downsample

    @property
    def n_tokens(self) -> int:
        return self.grid**2


# The paper's three tokenizers (Table A1). A recipe picks one with `model.name` and overrides fields on top,
# so the size table lives here once instead of in copied YAML.
_G = ModelConfig(
    name="mergevq-g",
    encoder=EncoderConfig(kind="hybrid", ch=64, ch_mult=(1, 2, 4, 8), dim=512, heads=8, init="dinov2"),
    decoder=DecoderConfig(ch=64, ch_mult=(1, 2, 4, 8), dim=512, heads=8),
    align_head=AlignHeadConfig(kind="layer2"),
)
_GR = ModelConfig(
    name="mergevq-gr",
    encoder=EncoderConfig(kind="hybrid", ch=64, ch_mult=(1, 1, 2, 4, 8), dim=512, heads=8, init="dinov2"),
    decoder=DecoderConfig(ch=64, ch_mult=(1, 1, 2, 4, 8), dim=512, heads=8),
    align_head=AlignHeadConfig(kind="layer3"),
)
_R = ModelConfig(
    name="mergevq-r",
    encoder=EncoderConfig(kind="vit", patch_size=16, dim=768, heads=12, init="random"),
    decoder=DecoderConfig(ch=64, ch_mult=(1, 1, 2, 4, 8), dim=512, heads=8),
    align_head=AlignHeadConfig(kind="layer3"),
)
MODEL_PRESETS: dict[str, ModelConfig] = {m.name: m for m in (_G, _GR, _R)}


def model_preset(name: Any, where: str = "model.name") -> ModelConfig:
    if name not in MODEL_PRESETS:
        close = difflib.get_close_matches(str(name), list(MODEL_PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}={name!r} is not a tokenizer{hint} (choose one of {', '.join(MODEL_PRESETS)})")
    return MODEL_PRESETS[name]


# ----------------------------------------------------------------------------- quantiser and merging


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    dim: int = 18  # code bits D; codebook 2**D
    temperature: float = 0.01  # entropy softmax temperature over 2<z,c>
    groups: int = 1  # codebook entropy over G groups of D/G bits (1 = exact joint entropy)
    sample_entropy_weight: float = 1.0
    codebook_entropy_weight: float = 1.0
    entropy_chunk: int = 4096  # tokens per chunk in the codebook-entropy accumulation

    def __post_init__(self) -> None:
        _check(1 <= self.dim <= 30, f"quant.dim={self.dim} must be in 1..30")
        _check(self.groups >= 1 and self.dim % self.groups == 0, f"quant.groups={self.groups} must divide quant.dim={self.dim}")
        _check(self.temperature > 0, "quant.temperature must be > 0")

    @property
    def codebook_size(self) -> int:
        return 2**self.dim


@dataclass(frozen=True, kw_only=True)
class MergeConfig:
    keep: int = 256  # K, the merged tokens kept (a perfect square ≤ N); the release stores N-K instead
    schedule: str = "linear"  # linear (release: 1.5r → 0.5r, remainder on layer 0) | square
    sampler: str = "gaussian"  # keep-count sampling in training: gaussian | exponential | fixed
    candidates: int = 6  # how many perfect squares around K the sampler draws from
    proportional_attn: bool = True  # attention logits + log(size), paper Eq. 14

    def __post_init__(self) -> None:
        _one_of(self.schedule, "merge.schedule", ("linear", "square"))
        _one_of(self.sampler, "merge.sampler", ("gaussian", "exponential", "fixed"))
        _check(self.keep >= 1 and math.isqrt(self.keep) ** 2 == self.keep, f"merge.keep={self.keep} is not a perfect square")
        _check(self.candidates >= 1, "merge.candidates must be >= 1")


# ----------------------------------------------------------------------------- losses, data, training


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    recon: str = "l2"  # l2 (paper) | l1 (release)
    recon_weight: float = 1.0
    perceptual_weight: float = 0.7  # LPIPS-VGG; paper 0.7, release 1.0
    vgg_weights: str | None = None  # torchvision vgg16 state dict; default $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth
    gan_weight: float = 0.1  # generator adversarial weight (release gen_loss_weight)
    disc_weight: float = 0.8  # paper's "discriminator loss 0.8" (release: only feeds an unused adaptive weight)
    gan_start: int = 0  # step from which the adversarial terms are on
    disc_ndf: int = 64
    disc_layers: int = 3
    lecam_weight: float = 0.01
    lecam_decay: float = 0.999
    entropy_weight: float = 0.1
    commit_weight: float = 0.25
    source_weight: float = 0.5  # source recovery CE, paper Eq. 9
    align_weight: float = 1.0  # paper Eq. 10
    align_teacher: str = "dinov2"  # dinov2 (local weights) | ema (self-distillation) | none
    teacher_weights: str | None = None  # local timm vit_base_patch14_dinov2 weights
    align_loss: str = "kl"  # kl (release, T^2-scaled) | ce (DINO-style, paper wording)
    align_temperature: float = 4.0

    def __post_init__(self) -> None:
        _one_of(self.recon, "loss.recon", ("l2", "l1"))
        _one_of(self.align_teacher, "loss.align_teacher", ("dinov2", "ema", "none"))
        _one_of(self.align_loss, "loss.align_loss", ("kl", "ce"))
        for name in ("recon_weight", "perceptual_weight", "gan_weight", "lecam_weight", "entropy_weight",
                     "commit_weight", "source_weight", "align_weight"):
            _check(getattr(self, name) >= 0, f"loss.{name} must be >= 0")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    source: str = "imagefolder"  # imagefolder (data.root) | shapes (procedural, built in) | photos (shipped samples)
    root: str | None = None  # training images; class subfolders give labels (ImageNet layout)
    val_root: str | None = None
    teacher_size: int = 224  # alignment views (paper: 224 px teacher and student crops)
    student_size: int = 224
    num_workers: int = 8

    def __post_init__(self) -> None:
        _one_of(self.source, "data.source", ("imagefolder", "shapes", "photos"))


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
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
    ema_decay: float = 0.999
    precision: str = "bf16"  # bf16 | fp16 | fp32 (autocast on CUDA only)
    seed: int = 0
    log_every: int = 50
    eval_every: int = 2000
    ckpt_every: int = 2000
    eval_images: int = 500  # held-out images for PSNR, codebook usage and source-recovery accuracy
    eval_tokens: tuple[int, ...] = ()  # K values of the PSNR table; () = ((√K/2)², K, N)

    def __post_init__(self) -> None:
        _check_training(self)
        _check(self.eval_images >= 1, "train.eval_images must be >= 1")


def _check_training(t: Any) -> None:
    """The checks stage 1 and stage 2 share: optimiser, schedule, precision, batch sizes and step counts."""
    _one_of(t.schedule, "train.schedule", ("step", "cosine"))
    _one_of(t.precision, "train.precision", ("bf16", "fp16", "fp32"))
    _one_of(t.optimizer, "train.optimizer", ("adamw",))
    _check(t.batch_size >= 1 and t.micro_batch >= 1, "train.batch_size and train.micro_batch must be >= 1")
    _check(t.lr > 0, "train.lr must be > 0")
    _check(all(0 < f <= 1 for f in t.lr_drops), "train.lr_drops are fractions in (0, 1]")
    for name in ("log_every", "eval_every", "ckpt_every", "epochs"):
        _check(getattr(t, name) >= 1, f"train.{name} must be >= 1")
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps must be >= 1")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    kind: Literal["tokenizer"] = "tokenizer"
    model: ModelConfig = field(default_factory=lambda: MODEL_PRESETS["mergevq-g"])
    quant: QuantConfig = field(default_factory=QuantConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        n = self.model.n_tokens
        _check(self.merge.keep <= n, f"merge.keep={self.merge.keep} exceeds N={n} tokens ({self.model.grid}x{self.model.grid})")
        for k in self.train.eval_tokens:
            self.check_keep(k, "train.eval_tokens:")
        _check(
            self.merge.keep >= self.min_keep,
            f"merge.keep={self.merge.keep} is below {self.min_keep}, the fewest {self.model.encoder.depth} blocks can keep of N={n}",
        )

    @property
    def min_keep(self) -> int:
        """Fewest tokens the encoder can keep: each block merges at most half of its image tokens."""
        t = self.model.n_tokens
        for _ in range(self.model.encoder.depth):
            t -= t // 2
        return t

    @property
    def eval_tokens(self) -> tuple[int, ...]:
        """K values the evaluation reports: the recipe's list, or ((√K/2)², K, N)."""
        if self.train.eval_tokens:
            return tuple(sorted(set(self.train.eval_tokens)))
        low = max(math.isqrt(self.merge.keep) // 2, math.isqrt(self.min_keep - 1) + 1) ** 2
        return tuple(sorted({low, self.merge.keep, self.model.n_tokens}))

    def check_keep(self, keep: int, what: str = "--tokens") -> int:
        """Validate a keep count K: a perfect square in [min_keep, N]."""
        n, lo = self.model.n_tokens, self.min_keep
        if keep < lo or keep > n or math.isqrt(keep) ** 2 != keep:
            raise ConfigError(f"{what} {keep}: K must be a perfect square between {lo} and N={n}")
        return keep


# ----------------------------------------------------------------------------- stage 2 (kind: ar)

GENERATOR_NAMES = ("llamagen", "mergear", "randar")
GPT_SIZE_NAMES = ("tiny", "s", "b", "l", "xl", "xxl")


@dataclass(frozen=True, kw_only=True)
class GPTModelConfig:
    size: str = "l"  # LlamaGen family preset for depth/dim/heads: tiny | s | b | l | xl | xxl
    depth: int | None = None  # None: from the size preset
    dim: int | None = None
    heads: int | None = None
    ffn_hidden: int | None = None  # None: LLaMA's round_up(8·dim/3, 256)
    vocab_size: int | None = None  # None: the token shards' codebook size
    n_tokens: int | None = None  # N grid positions; None: from the token shards
    num_classes: int | None = None  # None: from the token shards' labels
    factorized: tuple[int, ...] | None = None  # sub-token bits, LSB first; None: (6, 12) for 2^18, one head up to
    factor_depth: int = 2  # 2^14, else two halves. [] forces one head. factor_depth: intra-position blocks
    dropout: float = 0.1  # residual and FFN dropout
    token_dropout: float = 0.1

    def __post_init__(self) -> None:
        _one_of(self.size, "model.size", GPT_SIZE_NAMES)
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

    def __post_init__(self) -> None:
        _one_of(self.name, "generator.name", GENERATOR_NAMES)
        _one_of(self.mask_groups, "generator.mask_groups", ("id", "source"))
        _check(self.window is None or self.window >= 1, "generator.window must be >= 1")
        if self.tokens is not None:
            _check(self.tokens >= 1 and math.isqrt(self.tokens) ** 2 == self.tokens, "generator.tokens must be a square")
        _check(self.steps is None or self.steps >= 1, "generator.steps must be >= 1")


@dataclass(frozen=True, kw_only=True)
class ARDataConfig:
    tokens: str | None = None  # token-shards folder from `mergevq tokenize` (or --tokens DIR)
    val_items: int = 512  # items held out (the last ones) for the validation loss
    num_workers: int = 2

    def __post_init__(self) -> None:
        _check(self.val_items >= 1, "data.val_items must be >= 1")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")


@dataclass(frozen=True, kw_only=True)
class ARTrainConfig:
    batch_size: int = 256  # global batch (all GPUs × accumulation)
    micro_batch: int = 32
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05  # matrices and embeddings only (never norms)
    optimizer: str = "adamw"
    schedule: str = "cosine"  # step | cosine
    warmup_steps: int = 0
    lr_drops: tuple[float, ...] = ()
    epochs: int = 300
    max_steps: int | None = None
    grad_clip: float = 1.0
    label_drop: float = 0.1  # class → null class, for classifier-free guidance
    label_smoothing: float = 0.0
    precision: str = "bf16"  # bf16 | fp16 | fp32 (autocast on CUDA only)
    seed: int = 0
    log_every: int = 50
    eval_every: int = 2000
    ckpt_every: int = 2000
    init: str | None = None  # a generator run or checkpoint whose weights start a new run (fresh optimizer)

    def __post_init__(self) -> None:
        _check_training(self)
        _check(0.0 <= self.label_drop < 1.0, "train.label_drop must be in [0, 1)")
        _check(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class ARRunConfig:
    kind: Literal["ar"] = "ar"
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    model: GPTModelConfig = field(default_factory=GPTModelConfig)
    data: ARDataConfig = field(default_factory=ARDataConfig)
    train: ARTrainConfig = field(default_factory=ARTrainConfig)

    def gpt_config(self, vocab_size: int | None = None, n_tokens: int | None = None, num_classes: int | None = None):
        """The backbone's GPTConfig; values the recipe leaves null come from the arguments (the token shards)."""
        from .models.gpt import GPT_SIZES, GPTConfig

        m = self.model
        vocab = m.vocab_size or vocab_size
        n = m.n_tokens or n_tokens
        classes = m.num_classes or num_classes
        missing = [name for name, v in (("model.vocab_size", vocab), ("model.n_tokens", n), ("model.num_classes", classes)) if v is None]
        _check(not missing, f"{', '.join(missing)} not set: give them in the recipe or train on token shards (--tokens DIR)")
        depth, dim, heads = GPT_SIZES[m.size]
        bits = m.sub_bits(int(vocab))  # type: ignore[arg-type]
        try:
            return GPTConfig(
                vocab_size=int(vocab), max_len=int(n), num_classes=int(classes), depth=m.depth or depth,  # type: ignore[arg-type]
                dim=m.dim or dim, heads=m.heads or heads, ffn_hidden=m.ffn_hidden, factorized=bits,
                factor_depth=m.factor_depth if len(bits) >= 2 else 0, dropout=m.dropout, token_dropout=m.token_dropout,
            )
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None

    def generator_options(self, default_tokens: int | None = None) -> dict[str, Any]:
        """Keyword options of the registered generator class."""
        g = self.generator
        if g.name == "mergear":
            return {"window": g.window, "mask_groups": g.mask_groups, "default_tokens": g.tokens or default_tokens}
        if g.name == "randar":
            return {"default_tokens": g.tokens or default_tokens}
        return {}


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Turn a YAML value into the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}={value!r}: must be one of {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], where: str = "", base: Any = None) -> Any:
    """Build `cls` from a mapping; fields the mapping omits come from `base` (a preset) or the defaults."""
    if cls is ModelConfig and base is None:
        base = model_preset(data.get("name", ModelConfig().name), f"{where}.name" if where else "name")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {} if base is None else {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
    for key, value in data.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {full!r}{hint} (valid: {', '.join(names)})")
        sub_base = getattr(base, key) if base is not None else None
        if dataclasses.is_dataclass(hints[key]) and sub_base is not None and isinstance(value, dict):
            kwargs[key] = _build(hints[key], value, full, sub_base)
        else:
            kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except TypeError as e:  # only reachable through programming errors: kw_only dataclasses take every field
        raise ConfigError(f"{where or 'config'}: {e}") from None


def parse_override(pair: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a","b","c"], value parsed as YAML, so 4 → int, [1,2] → list, null → None)."""
    if "=" not in pair:
        raise ConfigError(f"--set {pair!r}: expected key=value, e.g. model.decoder.depth=4")
    key, raw = pair.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {pair!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
        try:
            value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            pass
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set dotted keys in a raw (pre-dataclass) mapping; unknown keys are caught later by the strict build."""
    for pair in overrides:
        keys, value = parse_override(pair)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {pair!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{p}: malformed YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read recipe: {e}") from None
    if data is None:
        raise ConfigError(f"{p}: the recipe is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return data


def config_from_dict(data: dict[str, Any], where: str = "") -> RunConfig:
    return _build(RunConfig, data, where)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a tokenizer recipe, apply `--set` overrides and build the validated config tree."""
    if recipe_kind(read_yaml(path), path) == "ar":
        raise ConfigError(f"{path} is a generator recipe (kind: ar): use `mergevq train-ar`")
    cfg = load_any_config(path, overrides)
    if not isinstance(cfg, RunConfig):
        raise ConfigError(f"{path} is a generator recipe (kind: ar): use `mergevq train-ar`")
    return cfg


def recipe_kind(data: dict[str, Any], where: str | Path) -> str:
    kind = data.get("kind", "tokenizer")
    if kind not in ("tokenizer", "ar"):
        raise ConfigError(f"{where}: kind={kind!r}: must be tokenizer or ar")
    return kind


def load_any_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig | ARRunConfig:
    """A tokenizer (kind: tokenizer, the default) or generator (kind: ar) recipe with `--set` overrides."""
    data = apply_overrides(read_yaml(path), overrides)
    try:
        if recipe_kind(data, path) == "ar":
            return _build(ARRunConfig, data)
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_ar_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ARRunConfig:
    """Read a generator recipe (kind: ar)."""
    if recipe_kind(read_yaml(path), path) != "ar":
        raise ConfigError(f"{path} is a tokenizer recipe: use `mergevq train-tokenizer` (generator recipes say kind: ar)")
    cfg = load_any_config(path, overrides)
    if not isinstance(cfg, ARRunConfig):
        raise ConfigError(f"{path} is a tokenizer recipe: use `mergevq train-tokenizer` (generator recipes say kind: ar)")
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON output and checkpoints."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)
