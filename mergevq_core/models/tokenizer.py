"""The MergeVQ tokenizer: encode images to K merged LFQ ids plus their source `assign`, decode them back.

Shape letters: B batch, N original tokens (g×g), K kept tokens (a perfect square), D code bits, C width.
The source matrix S (B, K, N) is stored as `assign` (B, N): S[b, k, n] = 1 iff assign[b, n] == k.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..quant import LFQ, QuantOut, indices_to_codes
from ..tome import canonical_assign, merge_schedule
from .decoder import AdaGN, Decoder, recover_full, to_grid
from .encoder import AlignHead, CodeProjection, MergeEncoder
from .recovery import SourceRecovery


class Encoded(NamedTuple):
    ids: Tensor  # (B, K) int64 codebook indices, canonical order
    assign: Tensor  # (B, N) int64 in [0, K): which slot absorbed each original token
    quantized: Tensor  # (B, K, D) ±1 codes with a straight-through gradient to the encoder
    cls: Tensor  # (B, C) encoder cls token (alignment, probing)
    size: Tensor  # (B, K) original tokens per slot
    quant: QuantOut  # commitment and entropy terms for training


class MergeVQTokenizer(nn.Module):
    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.n_tokens = m.n_tokens
        self.encoder = MergeEncoder(m.encoder, prop_attn=cfg.merge.proportional_attn, norm_eps=m.norm_eps)
        self.code_proj = CodeProjection(m.encoder.dim, cfg.quant.dim)
        q = cfg.quant
        self.quantizer = LFQ(q.dim, q.temperature, q.groups, q.sample_entropy_weight, q.codebook_entropy_weight, q.entropy_chunk)
        self.decoder = Decoder(m.decoder, cfg.quant.dim, norm_eps=m.norm_eps)
        self.recovery = SourceRecovery(m.recovery, cfg.quant.dim, m.n_tokens) if m.recovery.enabled else None
        self.align_head = AlignHead(m.encoder.dim, m.align_head.out_dim, m.align_head.kind) if m.align_head.kind != "none" else None
        for part in self.trunc_normal_parts(m.init_scheme):
            part.apply(_init_weights)
        for m in self.modules():  # parts whose own init the generic one above must not override
            if isinstance(m, (AdaGN, AlignHead)):
                m.reset_parameters()
        nn.init.normal_(self.encoder.cls_token, std=1e-6)

    def trunc_normal_parts(self, scheme: str) -> list[nn.Module]:
        """The modules whose Linear and conv layers start at trunc_normal(0.02) with zero bias (`model.init_scheme`):
        `release`: the transformer blocks of the encoder and decoder and the source recovery model, the CNN parts
        keeping PyTorch's defaults; `all-trunc-normal`: the whole tokenizer."""
        if scheme == "all-trunc-normal":
            return [self]
        if scheme != "release":
            raise ValueError(f"unknown init scheme {scheme!r}")
        parts: list[nn.Module] = [self.encoder.blocks, self.decoder.blocks]
        return parts + ([self.recovery] if self.recovery is not None else [])

    # ------------------------------------------------------------------ merging
    def schedule(self, tokens: int | None = None) -> tuple[int, ...]:
        """Merges per encoder block to keep `tokens` of N (default: the recipe's merge.keep)."""
        keep = self.cfg.merge.keep if tokens is None else self.cfg.check_keep(tokens)
        return _schedule(self.n_tokens, keep, len(self.encoder.blocks), self.cfg.merge.schedule)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, images: Tensor, tokens: int | None = None, compute_entropy: bool = False) -> Encoded:
        """images (B, 3, H, W) in [-1, 1] → K = `tokens` merged ids and their source."""
        out = self.encoder(images, self.schedule(tokens))
        z = self.code_proj(out.tokens)  # (B, K, D)
        qo = self.quantizer(z, compute_entropy=compute_entropy)
        return Encoded(qo.indices, out.assign, qo.quantized, out.cls, out.size, qo)

    def decode_codes(self, quantized: Tensor, assign: Tensor) -> Tensor:
        """quantized (B, K, D), assign (B, N) → images (B, 3, H, W). Gradients reach `quantized`."""
        return self.decoder(to_grid(recover_full(quantized, assign)))

    def decode(self, ids: Tensor, assign: Tensor) -> Tensor:
        """ids (B, K), assign (B, N) → images (B, 3, H, W) in about [-1, 1]."""
        codes = indices_to_codes(ids, self.quantizer.dim).to(self._dtype())
        return self.decode_codes(codes, assign)

    def forward(self, images: Tensor, tokens: int | None = None, compute_entropy: bool = False) -> tuple[Tensor, Encoded]:
        enc = self.encode(images, tokens, compute_entropy)
        return self.decode_codes(enc.quantized, enc.assign), enc

    # ------------------------------------------------------------------ source recovery and alignment
    def recovery_logits(self, quantized: Tensor) -> Tensor:
        """(B, K, D) → (B, N, K) logits of the source recovery model."""
        if self.recovery is None:
            raise RuntimeError("this tokenizer has no source recovery model (model.recovery.enabled=false)")
        return self.recovery(quantized)

    @torch.no_grad()
    def predict_assign(self, ids: Tensor, constrained: bool = True) -> Tensor:
        """ids (B, K) alone → predicted assign (B, N) in [0, K): what generation has instead of the true source.
        `constrained`: the most likely assign that respects the canonical order (`canonical_assign`); otherwise
        each position's own argmax, which may skip slots or open them out of order."""
        codes = indices_to_codes(ids, self.quantizer.dim).to(self._dtype())
        logits = self.recovery_logits(codes).float()
        return canonical_assign(logits.log_softmax(dim=-1)) if constrained else logits.argmax(dim=-1)

    def align_features(self, images: Tensor, tokens: int | None = None) -> Tensor:
        """Student view (B, 3, h, w) → (B, out_dim) through a second encoder pass and the alignment head.
        The merge schedule is recomputed for the view's own token count, keeping the same fraction K/N."""
        if self.align_head is None:
            raise RuntimeError("this tokenizer has no alignment head (model.align_head.kind=none)")
        n = (images.shape[-2] // self.cfg.model.encoder.downsample) * (images.shape[-1] // self.cfg.model.encoder.downsample)
        keep = self.cfg.merge.keep if tokens is None else tokens
        side = max(1, round(math.sqrt(n * keep / self.n_tokens)))
        sched = _schedule(n, min(side * side, n), len(self.encoder.blocks), self.cfg.merge.schedule)
        return self.align_head(self.encoder(images, sched).cls)

    def prepare_inference(self, channels_last: bool = True) -> MergeVQTokenizer:
        """Eval mode, with the CNN parts (the encoder's stem, the decoder's conv stack) in channels_last memory
        (`channels_last=False`: back to contiguous). Same outputs to fp32 rounding; on an AVX2 CPU the G+R model's
        encode + decode ran ~1.15-1.3× faster. The transformer parts are left alone. Returns self."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        d = self.decoder
        for part in (self.encoder.stem, d.levels, d.norm_out, d.conv_out):
            part.to(memory_format=fmt)
        return self.eval()

    def _dtype(self) -> torch.dtype:
        return self.code_proj.proj.weight.dtype

    # ------------------------------------------------------------------ bookkeeping
    def param_groups(self) -> dict[str, nn.Module | None]:
        """Named parts as `mergevq info` reports them (encoder = stem, ToMe ViT and code projection)."""
        return {
            "encoder": nn.ModuleList([self.encoder, self.code_proj]),
            "decoder": self.decoder,
            "source_recovery": self.recovery,
            "align_head": self.align_head,
        }


@lru_cache(maxsize=256)
def _schedule(n: int, keep: int, depth: int, kind: str) -> tuple[int, ...]:
    return tuple(merge_schedule(n, keep, depth, kind))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def build_tokenizer(cfg: RunConfig) -> MergeVQTokenizer:
    return MergeVQTokenizer(cfg)
