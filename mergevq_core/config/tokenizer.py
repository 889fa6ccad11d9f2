"""Stage 1 (kind: tokenizer): the MergeVQ tokenizer, its quantiser, token merging, losses, data and training."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConfigError
from ._checks import _check, _one_of
from .training import TrainLoopConfig
from .version import CONFIG_VERSION


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
    # AdaGN's spatial std of z: sqrt(var + 1e-6) with the unbiased variance (÷ (n - 1)), as the release's
    # `var(dim=-1)` computes (its "not unbias" comment is wrong about its own code); the paper does not say.
    # false: the biased variance (÷ n), what configs before version 2 used.
    adagn_unbiased: bool = True

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
    # LayerNorm eps of the encoder's and decoder's transformer blocks: 1e-5, the release's (timm blocks, PyTorch's
    # default); the paper does not say. Configs before version 2 used 1e-6.
    norm_eps: float = 1e-5
    # release: trunc_normal(0.02) on the Linear and conv layers of the transformer blocks (encoder and decoder) and
    # of the source recovery model, PyTorch's defaults on the CNN parts (stem, code projection, decoder convs and
    # ResBlocks), as the release initialises; the paper does not say. all-trunc-normal: trunc_normal(0.02) on every
    # Linear and conv, what configs before version 2 used (it matters only to a new run: checkpoints hold weights).
    init_scheme: str = "release"

    def __post_init__(self) -> None:
        _check(self.norm_eps > 0, "model.norm_eps must be > 0")
        _one_of(self.init_scheme, "model.init_scheme", ("release", "all-trunc-normal"))
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
    # square: the paper's "square decreasing schedule" (A.1), merges per block ∝ (depth - l)²;
    # linear: the release's (ToMe's decreasing ramp 1.5r → 0.5r, remainder on block 0)
    schedule: str = "square"
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
    # weight of the discriminator's loss (hinge + LeCam) in its update: paper Table A1 "discriminator loss 0.8".
    # The release's disc_weight 0.8 only feeds an adaptive generator weight that gen_loss_weight bypasses, so it
    # changes nothing there; configs before version 2 stored it but applied 1.0.
    disc_weight: float = 0.8
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
    # ce: the paper's Eq. 10, DINO-style cross-entropy (centred teacher at τ 0.04, student at τ 0.1);
    # kl: the release's T²·KL(softmax(t/T) ‖ softmax(s/T)) at T = align_temperature (release: 4, i.e. ×16)
    align_loss: str = "ce"
    align_temperature: float = 4.0  # kl only

    def __post_init__(self) -> None:
        _one_of(self.recon, "loss.recon", ("l2", "l1"))
        _one_of(self.align_teacher, "loss.align_teacher", ("dinov2", "ema", "none"))
        _one_of(self.align_loss, "loss.align_loss", ("kl", "ce"))
        for name in ("recon_weight", "perceptual_weight", "gan_weight", "disc_weight", "lecam_weight", "entropy_weight",
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
class TrainConfig(TrainLoopConfig):
    """Stage-1 training: the shared loop plus the EMA and the held-out evaluation."""

    ema_decay: float = 0.999
    eval_images: int = 500  # held-out images for PSNR, codebook usage and source-recovery accuracy
    eval_tokens: tuple[int, ...] = ()  # K values of the PSNR table; () = ((√K/2)², K, N)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.eval_images >= 1, "train.eval_images must be >= 1")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    kind: Literal["tokenizer"] = "tokenizer"
    version: int = CONFIG_VERSION  # config version (config/version.py); older saved configs are upgraded on load
    model: ModelConfig = field(default_factory=lambda: MODEL_PRESETS["mergevq-g"])
    quant: QuantConfig = field(default_factory=QuantConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check(self.version == CONFIG_VERSION,
               f"version={self.version}: older configs are built through config_from_dict / config_from_saved")
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
