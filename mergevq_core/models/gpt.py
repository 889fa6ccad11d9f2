"""Stage-2 autoregressive backbone: a LLaMA-style class-conditional GPT with 2D RoPE (LlamaGen design).

Shape letters: B batch, L sequence, H heads, D head dim, C model width, T cache slots, V vocabulary (V_i per
sub-token).

The backbone knows nothing about sequence layouts: a generator (`mergevq_core.generators`) builds the input
embeddings and rotary angles of its layout ([class, x...] for LlamaGen, [class, M, x...] for MergeAR,
[class, PI, x, PI, x ...] for RandAR) and calls the three entry points:

- `trunk(x, cos, sin, mask)`: teacher forcing over a whole sequence, returns normalised hidden states;
- `trunk(x, cos, sin, cache=cache)` after `cache.begin(...)`: prefill (several tokens) or one decode step; the
  `KVCache` is an explicit object owned by the caller;
- `logits(h, targets)` for training and `sample_ids(h, pick)` for decoding.

Output heads: a plain head over V ids, or a factorised head for large LFQ codebooks (2^18 = 2^6 · 2^12 as in the
public release): an id is split into sub-tokens by bits (LSB first) and each is predicted by its own head. With
`factor_depth > 0` (the release uses 2) a small transformer runs inside each position over
[h, e_0(s_0), ..., e_{n-2}(s_{n-2})], so sub-token i is predicted knowing sub-tokens 0..i-1.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..nn.blocks import SwiGLU
from ..nn.norm import RMSNorm
from ..nn.rope import apply_rope, identity_rope, rope_2d
from .kv_cache import KVCache

__all__ = [
    "GPT", "Attention", "Block", "GPTConfig", "KVCache", "Logits", "gpt_config", "gpt_config_from_recipe", "gpt_l",
    "gpt_tiny", "GPT_SIZES",
]

Logits = Tensor | tuple[Tensor, ...]

# name: (depth, dim, heads), LlamaGen's family (head dim 64)
GPT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (2, 32, 4), "s": (6, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (36, 1280, 20),
    "xxl": (48, 1536, 24),
}


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """vocab_size: codebook size V. max_len: image tokens N of the grid (default positions). factorized: sub-token
    bit widths, LSB first (e.g. (6, 12) for V = 2^18); () means one plain head. factor_depth: blocks of the
    intra-position transformer of a factorised head (0 = independent heads). ffn_hidden None follows LLaMA:
    round_up(8C/3, 256). dropout: residual and FFN dropout; token_dropout: on the input embeddings."""

    vocab_size: int
    max_len: int
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    ffn_hidden: int | None = None
    num_classes: int = 1000
    factorized: tuple[int, ...] = ()
    factor_depth: int = 0
    dropout: float = 0.0
    token_dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "factorized", tuple(self.factorized))
        for name in ("vocab_size", "max_len", "dim", "depth", "heads", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.head_dim % 4:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {self.head_dim}")
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            raise ValueError(f"ffn_hidden must be positive, got {self.ffn_hidden}")
        if self.factorized:
            if any(b < 1 for b in self.factorized):
                raise ValueError(f"factorized bit widths must be positive, got {self.factorized}")
            if 2 ** sum(self.factorized) != self.vocab_size:
                raise ValueError(f"factorized bits {self.factorized} must sum to log2(vocab_size={self.vocab_size})")
        if self.factor_depth < 0 or (self.factor_depth and len(self.factorized) < 2):
            raise ValueError("factor_depth needs a factorised head with at least two sub-tokens")
        for name in ("dropout", "token_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.norm_eps <= 0 or self.rope_base <= 0:
            raise ValueError("norm_eps and rope_base must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def hidden(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return -(-int(2 * 4 * self.dim / 3) // 256) * 256

    @property
    def sub_vocab(self) -> tuple[int, ...]:
        """Vocabulary of each sub-token: (V,) for a plain head, (2^b_0, 2^b_1, ...) when factorised."""
        return tuple(2**b for b in self.factorized) or (self.vocab_size,)

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Bytes one cached token costs over all layers (keys and values)."""
        return 2 * self.depth * self.dim * bytes_per_value


def gpt_config(size: str, vocab_size: int, max_len: int, **kw) -> GPTConfig:
    """A GPTConfig of a named size from `GPT_SIZES` (tiny, s, b, l, xl, xxl); `kw` overrides any field."""
    if size not in GPT_SIZES:
        raise ValueError(f"unknown GPT size {size!r}; choose one of {', '.join(GPT_SIZES)}")
    depth, dim, heads = GPT_SIZES[size]
    return GPTConfig(**{"vocab_size": vocab_size, "max_len": max_len, "depth": depth, "dim": dim, "heads": heads, **kw})


def gpt_config_from_recipe(m: Any, vocab_size: int | None = None, n_tokens: int | None = None,
                           num_classes: int | None = None) -> GPTConfig:
    """The GPTConfig a generator recipe's `model` section (`config.ar.GPTModelConfig`) describes; values the recipe
    leaves null come from the arguments (the token shards). Invalid combinations raise `ConfigError` naming the
    recipe key."""
    from ..errors import ConfigError

    if m.size not in GPT_SIZES:
        close = difflib.get_close_matches(str(m.size), list(GPT_SIZES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"model.size={m.size!r}{hint} (choose one of {', '.join(GPT_SIZES)})")
    vocab = m.vocab_size or vocab_size
    n = m.n_tokens or n_tokens
    classes = m.num_classes or num_classes
    missing = [name for name, v in (("model.vocab_size", vocab), ("model.n_tokens", n), ("model.num_classes", classes)) if v is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not set: give them in the recipe or train on token shards (--shards DIR)")
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


def gpt_l(vocab_size: int, max_len: int, factorized: tuple[int, ...] = (), factor_depth: int = 0) -> GPTConfig:
    """LlamaGen-L: 24 layers, width 1024, 16 heads, SwiGLU hidden 2816."""
    return gpt_config("l", vocab_size, max_len, factorized=factorized, factor_depth=factor_depth)


def gpt_tiny(vocab_size: int = 64, max_len: int = 16, factorized: tuple[int, ...] = (), factor_depth: int = 0) -> GPTConfig:
    """A CPU test size: 2 layers, width 32, 4 heads, 10 classes."""
    return gpt_config("tiny", vocab_size, max_len, factorized=factorized, factor_depth=factor_depth, num_classes=10)


# ----------------------------------------------------------------------------- layers


class DecodeLinear(nn.Linear):
    """nn.Linear (same parameters and state dict) that, for the few rows of a decode step on a CPU, computes
    (W·xᵀ)ᵀ instead of x·Wᵀ: MKL then streams W once as a matrix-vector product instead of packing it for a
    GEMM, measured 1.3–3.4× faster for 2–64 rows on a 2-core AVX2 EPYC (M = 1 and training keep F.linear)."""

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if 2 <= rows <= 128 and x.device.type == "cpu" and self.bias is None and not torch.is_grad_enabled():
            return torch.mm(self.weight, x.reshape(rows, -1).t()).t().reshape(*x.shape[:-1], self.out_features)
        return super().forward(x)


class Attention(nn.Module):
    """Bias-free multi-head self-attention with 2D RoPE on q and k (applied before caching), through SDPA."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """x (B, L, C); cos, sin (L, D/2) or (B, L, D/2); mask (no cache) None = causal, else bool (True = may
        attend) or additive, (L, L) or (B, L, L). With a cache the mask comes from the cache."""
        B, L, C = x.shape
        qkv = self.wqkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, L, D)
        q, k = apply_rope(qkv[:2], cos, sin).unbind(0)  # one rotation for q and k
        v = qkv[2]
        if cache is not None:
            k, v, mask = cache.update(layer, k, v)  # (B, H, T, D)
            causal = mask is None and q.shape[2] > 1
            if causal and k.shape[2] > q.shape[2]:  # new queries after cached keys: bottom-right causal
                n, t = q.shape[2], k.shape[2]
                mask = torch.arange(t, device=x.device)[None] <= (t - n) + torch.arange(n, device=x.device)[:, None]
                causal = False
        else:
            causal = mask is None
            if mask is not None and mask.dim() == 3:
                mask = mask[:, None]  # (B, 1, L, L)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, L, D)
        return self.wo(out.transpose(1, 2).reshape(B, L, C))


class Block(nn.Module):
    """Pre-norm block: x + drop(Attn(norm(x))), then + SwiGLU(norm(x)), whose output dropout is the FFN path's
    only one (LlamaGen: resid_dropout after wo, ffn_dropout after w2, drop-path 0)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.hidden, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)  # the attention output's

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask, cache, layer))
        return x + self.ffn(self.ffn_norm(x))


# ----------------------------------------------------------------------------- model


class GPT(nn.Module):
    """Class-conditional GPT over (optionally factorised) token ids; see the module docstring.

    The class table has num_classes + 1 rows; the last is the null class for CFG.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cls_embed = nn.Embedding(cfg.num_classes + 1, cfg.dim)
        self.tok_embed = nn.ModuleList(nn.Embedding(v, cfg.dim) for v in cfg.sub_vocab)
        self.embed_drop = nn.Dropout(cfg.token_dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.factor_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.factor_depth))
        self.factor_norm = RMSNorm(cfg.dim, cfg.norm_eps) if cfg.factor_depth else None
        self.heads = nn.ModuleList(nn.Linear(cfg.dim, v, bias=False) for v in cfg.sub_vocab)
        self.apply(self._init_weights)
        for head in self.heads:
            nn.init.zeros_(head.weight)
        for m in self.modules():  # decode steps take DecodeLinear's matrix-vector path (no new parameters)
            if type(m) is nn.Linear:
                m.__class__ = DecodeLinear

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------- ids and embeddings
    def split_ids(self, ids: Tensor) -> tuple[Tensor, ...]:
        """Full ids (any shape) -> one id tensor per sub-token, LSB first; (ids,) for a plain head."""
        if not self.cfg.factorized:
            return (ids,)
        parts, shift = [], 0
        for bits in self.cfg.factorized:
            parts.append((ids >> shift) & (2**bits - 1))
            shift += bits
        return tuple(parts)

    def join_ids(self, parts: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
        """Inverse of `split_ids`."""
        ids, shift = torch.zeros_like(parts[0]), 0
        for part, bits in zip(parts, self.cfg.factorized or (0,), strict=True):
            ids = ids | (part << shift)
            shift += bits
        return ids

    def embed_ids(self, ids: Tensor) -> Tensor:
        """(B, L) full ids -> (B, L, C): the sum of the sub-token embeddings."""
        return sum(emb(p) for emb, p in zip(self.tok_embed, self.split_ids(ids), strict=True))  # type: ignore[return-value]

    def embed_class(self, labels: Tensor) -> Tensor:
        """(B,) labels in [0, num_classes] (num_classes = null) -> (B, C)."""
        return self.cls_embed(labels)

    def rope(self, rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (..., D/2) of grid positions of any shape."""
        return rope_2d(self.cfg.head_dim, rows, cols, self.cfg.rope_base)

    def prefix_rope(self, n: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin (n, D/2), an identity rotation: the factorised head's intra-position sequence. (A generator's
        class and M tokens get theirs from `Generator.prefix_angles`.)"""
        return identity_rope(self.cfg.head_dim, n, device=device)

    # ---------------------------------------------------------------- entry points
    def trunk(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
              cache: KVCache | None = None) -> Tensor:
        """Input embeddings x (B, L, C) with rotations cos, sin ((L, D/2) or (B, L, D/2)) -> normalised hidden
        states (B, L, C). Without a cache, mask None means causal. With a cache, call `cache.begin` first and
        `cache.end` after; the mask is the cache's."""
        if cache is not None and mask is not None:
            raise ValueError("with a KV cache the attention mask comes from the cache")
        x = self.embed_drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, cache, i)
        return self.norm(x)

    def _factor(self, h: Tensor, prev: list[Tensor]) -> Tensor:
        """Intra-position transformer over [h, e_0(prev_0), ...]: h (R, C), prev (R,) each -> last state (R, C)."""
        seq = torch.stack([h, *(self.tok_embed[i](p) for i, p in enumerate(prev))], dim=1)  # (R, 1 + len(prev), C)
        cos, sin = self.prefix_rope(seq.shape[1], h.device)
        for block in self.factor_blocks:
            seq = block(seq, cos, sin)
        return self.factor_norm(seq[:, -1])  # type: ignore[misc]

    def logits(self, h: Tensor, targets: Tensor | None = None) -> Logits:
        """Teacher-forced logits of hidden states h (B, L, C): (B, L, V), or a tuple of (B, L, V_i) for a
        factorised head. The intra-position transformer (factor_depth > 0) needs the target ids (B, L)."""
        if not self.factor_blocks:
            out = tuple(head(h) for head in self.heads)
            return out if self.cfg.factorized else out[0]
        if targets is None:
            raise ValueError("a factorised head with factor_depth > 0 needs the target ids")
        B, L, C = h.shape
        subs = self.split_ids(targets.reshape(B * L))
        seq = torch.stack([h.reshape(B * L, C), *(self.tok_embed[i](s) for i, s in enumerate(subs[:-1]))], dim=1)
        cos, sin = self.prefix_rope(seq.shape[1], h.device)
        for block in self.factor_blocks:
            seq = block(seq, cos, sin)
        seq = self.factor_norm(seq)  # type: ignore[misc]
        return tuple(head(seq[:, i]).reshape(B, L, -1) for i, head in enumerate(self.heads))

    def sample_ids(self, h: Tensor, pick: Callable[[int, Tensor], Tensor]) -> Tensor:
        """Decode one id per row of h (R, C): for each sub-token i in order, `pick(i, logits (R, V_i))` returns the
        chosen sub-ids (R,) (it applies CFG and sampling); returns the joined full ids (R,)."""
        if not self.cfg.factorized:
            return pick(0, self.heads[0](h))
        chosen: list[Tensor] = []
        for i, head in enumerate(self.heads):
            state = self._factor(h, chosen) if self.factor_blocks else h
            chosen.append(pick(i, head(state)))
        return self.join_ids(chosen)

    def loss(self, logits: Logits, targets: Tensor, label_smoothing: float = 0.0, ignore_index: int = -100) -> Tensor:
        """Mean cross-entropy over positions, summed over sub-tokens. targets (B, L) full ids; `ignore_index`
        positions (padding) count for nothing."""
        parts = logits if isinstance(logits, tuple) else (logits,)
        keep = targets != ignore_index
        subs = self.split_ids(targets.clamp_min(0))
        return sum(  # type: ignore[return-value]
            F.cross_entropy(rearrange(lg, "b l v -> (b l) v").float(), torch.where(keep, t, ignore_index).flatten(),
                            label_smoothing=label_smoothing, ignore_index=ignore_index)
            for lg, t in zip(parts, subs, strict=True)
        )

    def new_cache(self, batch: int, capacity: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, static: bool = False) -> KVCache:
        """An empty cache of `capacity` slots for `batch` sequences, in the model's device and dtype by default."""
        ref = self.cls_embed.weight
        return KVCache(self.cfg.depth, batch, self.cfg.heads, capacity, self.cfg.head_dim,
                       device=device or ref.device, dtype=dtype or ref.dtype, static=static)
