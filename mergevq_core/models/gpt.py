"""Stage-2 autoregressive backbone: a LLaMA-style class-conditional GPT with 2D RoPE (LlamaGen design).

Shape letters: B batch, L sequence, H heads, D head dim, C model width, V vocabulary (V_i per sub-token).

Sequence convention (teacher forcing): the input is [class, x_0 ... x_{L-2}] and the output at input position t
predicts x_t, so logits have length L. The class token has no position (identity rotation); image token x_j carries
the 2D position (rows[j], cols[j]) of its grid slot j.

Entry points: `forward` (training, teacher forcing), `prefill` (runs the class token into a `KVCache`) and
`decode_step` (one token). Logits are a Tensor (B, ..., V) for a plain head and always a tuple of (B, ..., V_i), one
per sub-token, for a factorised head: the form depends on the config, never on an argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..nn.rope import apply_rope, grid_positions, identity_rope, rope_2d

__all__ = [
    "GPT", "Attention", "Block", "GPTConfig", "KVCache", "KVLayer", "Logits", "RMSNorm", "SwiGLU", "gpt_l", "gpt_tiny",
]

Logits = Tensor | tuple[Tensor, ...]


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """vocab_size: codebook size V. max_len: max image tokens N. factorized: sub-token bit widths, LSB first
    (e.g. (6, 12) for V = 2^18); () means one plain head. ffn_hidden None follows LLaMA: round_up(8C/3, 256)."""

    vocab_size: int
    max_len: int
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    ffn_hidden: int | None = None
    num_classes: int = 1000
    factorized: tuple[int, ...] = ()
    dropout: float = 0.0
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
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
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


def gpt_l(vocab_size: int, max_len: int, factorized: tuple[int, ...] = ()) -> GPTConfig:
    """LlamaGen-L: 24 layers, width 1024, 16 heads, SwiGLU hidden 2816."""
    return GPTConfig(vocab_size=vocab_size, max_len=max_len, factorized=factorized, dim=1024, depth=24, heads=16)


def gpt_tiny(vocab_size: int = 64, max_len: int = 16, factorized: tuple[int, ...] = ()) -> GPTConfig:
    """A CPU test size: 2 layers, width 32, 4 heads, 10 classes."""
    return GPTConfig(vocab_size=vocab_size, max_len=max_len, factorized=factorized, dim=32, depth=2, heads=4,
                     num_classes=10)


class KVCache:
    """Preallocated keys and values of every layer, (depth, B, H, T, D) each, and the live length.

    Each layer writes its new K/V at slots [length, length + n) through `append`, which returns views of the live
    slots only; `advance(n)` is called once per step after all layers. Keys are cached after RoPE, so `keep` can
    compact the live slots to any subset without touching positions. Meant for inference (no_grad).
    """

    def __init__(self, depth: int, batch: int, heads: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        self.k = torch.zeros(depth, batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def slice_length(self) -> int:
        """Number of live slots: attention reads exactly this many keys (plus the step's new ones)."""
        return self.length

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, H, n, D) at the current slots of `layer`; return that layer's (B, H, length + n, D) views."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} slots needed, {self.max_len} allocated")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int = 1) -> None:
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache overflow: advancing to {self.length + n} of {self.max_len}")
        self.length += n

    def reset(self) -> None:
        self.length = 0

    def keep(self, indices: Tensor) -> None:
        """Compact the live slots to `indices` (kept in the given order): (n,) shared by the batch, or (B, n)."""
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.length):
            raise ValueError(f"keep indices must lie in [0, {self.length})")
        n = indices.shape[-1]
        for buf in (self.k, self.v):
            if indices.dim() == 1:
                kept = buf[:, :, :, indices.to(buf.device)]  # (depth, B, H, n, D), a copy
            elif indices.dim() == 2:
                depth, _, heads, _, dh = buf.shape
                idx = indices.to(buf.device)[None, :, None, :, None].expand(depth, -1, heads, n, dh)
                kept = buf[:, :, :, : self.length].gather(3, idx)
            else:
                raise ValueError(f"keep indices must be (n,) or (B, n), got {tuple(indices.shape)}")
            buf[:, :, :, :n] = kept
        self.length = n

    def layer(self, index: int) -> KVLayer:
        return KVLayer(self, index)


@dataclass(frozen=True)
class KVLayer:
    """One layer's view of a `KVCache`, handed to that layer's attention."""

    cache: KVCache
    index: int

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.append(self.index, k, v)


class RMSNorm(nn.Module):
    """RMS norm computed in float32, with a learned scale."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.drop(F.silu(self.w1(x)) * self.w3(x)))


class Attention(nn.Module):
    """Bias-free multi-head self-attention with 2D RoPE on q and k (applied before caching), through SDPA."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: KVLayer | None = None) -> Tensor:
        """x (B, L, C); cos, sin (L, D/2) or (B, L, D/2); mask None = causal, else boolean (True = may attend) or
        additive, (L, T) or (B, L, T) with T the number of keys (cached + new)."""
        q, k, v = (rearrange(w(x), "b l (h d) -> b h l d", h=self.heads) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.cache.length
            k, v = cache.append(k, v)  # (B, H, T, D), T = start + L
        n_new, n_keys = q.shape[2], k.shape[2]
        causal = False
        if mask is None and n_new > 1:
            if start == 0:
                causal = True
            else:  # new queries see every cached key and the new keys up to themselves
                i = torch.arange(n_new, device=x.device)[:, None]
                mask = torch.arange(n_keys, device=x.device)[None, :] <= start + i  # (L, T)
        elif mask is not None and mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, L, T)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, L, D)
        return self.wo(rearrange(out, "b h l d -> b l (h d)"))


class Block(nn.Module):
    """Pre-norm block: x + Attn(norm(x)), then + SwiGLU(norm(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.hidden, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: KVLayer | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, mask, cache))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class GPT(nn.Module):
    """Class-conditional GPT over (optionally factorised) token ids.

    The class table has num_classes + 1 rows; the last is the null class for CFG. A factorised vocabulary splits an
    id by bits, LSB first (sub-token 0 = low bits), sums one embedding per sub-token and predicts each sub-token with
    its own head from the same hidden state. The public release instead conditions the second sub-token on the first
    through two extra transformer blocks per position; that is left out here.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cls_embed = nn.Embedding(cfg.num_classes + 1, cfg.dim)
        self.tok_embed = nn.ModuleList(nn.Embedding(v, cfg.dim) for v in cfg.sub_vocab)
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.heads = nn.ModuleList(nn.Linear(cfg.dim, v, bias=False) for v in cfg.sub_vocab)
        self.apply(self._init_weights)
        for head in self.heads:
            nn.init.zeros_(head.weight)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---------------------------------------------------------------- ids and logits
    def split_ids(self, ids: Tensor) -> tuple[Tensor, ...]:
        """Full ids (any shape) -> one id tensor per sub-token, LSB first; (ids,) for a plain head."""
        if not self.cfg.factorized:
            return (ids,)
        parts, shift = [], 0
        for bits in self.cfg.factorized:
            parts.append((ids >> shift) & (2**bits - 1))
            shift += bits
        return tuple(parts)

    def join_ids(self, parts: tuple[Tensor, ...]) -> Tensor:
        """Inverse of `split_ids`."""
        ids, shift = torch.zeros_like(parts[0]), 0
        for part, bits in zip(parts, self.cfg.factorized or (0,), strict=True):
            ids = ids | (part << shift)
            shift += bits
        return ids

    def _embed_tokens(self, ids: Tensor) -> Tensor:
        return sum(emb(p) for emb, p in zip(self.tok_embed, self.split_ids(ids), strict=True))  # (B, L, C)

    def _logits(self, h: Tensor) -> Logits:
        out = tuple(head(h) for head in self.heads)  # (B, ..., V_i) each
        return out if self.cfg.factorized else out[0]

    def _positions(self, rows: Tensor | None, cols: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
        if (rows is None) != (cols is None):
            raise ValueError("give both rows and cols, or neither")
        if rows is None or cols is None:
            return grid_positions(self.cfg.max_len, device=device)
        return rows.to(device), cols.to(device)

    def _run(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None) -> Tensor:
        x = self.embed_drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, None if cache is None else cache.layer(i))
        return self.norm(x)

    # ---------------------------------------------------------------- entry points
    def forward(self, ids: Tensor, labels: Tensor, rows: Tensor | None = None, cols: Tensor | None = None,
                mask: Tensor | None = None) -> Logits:
        """Teacher forcing: input [class, x_0 .. x_{L-2}] predicts [x_0 .. x_{L-1}].

        Shapes: ids (B, L) full ids; labels (B,) in [0, num_classes] (num_classes = null class); rows, cols (N,) or
        (B, N) grid position of each slot, N >= L - 1, raster over max_len by default; mask (L, L) or (B, L, L),
        True = may attend, replaces the causal default. Returns (B, L, V), or a tuple of (B, L, V_i) if factorised.
        """
        B, L = ids.shape
        rows, cols = self._positions(rows, cols, ids.device)
        x = torch.cat([self.cls_embed(labels)[:, None], self._embed_tokens(ids[:, :-1])], dim=1)  # (B, L, C)
        cos, sin = rope_2d(self.cfg.head_dim, rows[..., : L - 1], cols[..., : L - 1], self.cfg.rope_base)
        one, zero = identity_rope(self.cfg.head_dim, *cos.shape[:-2], 1, device=ids.device)
        cos, sin = torch.cat([one, cos], dim=-2), torch.cat([zero, sin], dim=-2)  # (L, D/2) or (B, L, D/2)
        return self._logits(self._run(x, cos, sin, mask, None))

    def loss(self, logits: Logits, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Mean cross-entropy over positions, summed over sub-tokens. targets (B, L) full ids."""
        parts = logits if isinstance(logits, tuple) else (logits,)
        return sum(
            F.cross_entropy(rearrange(lg, "b l v -> (b l) v").float(), t.flatten(), label_smoothing=label_smoothing)
            for lg, t in zip(parts, self.split_ids(targets), strict=True)
        )

    def new_cache(self, batch: int, max_len: int | None = None, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for `batch` sequences; max_len slots default to 1 + cfg.max_len (class + image tokens)."""
        ref = self.cls_embed.weight
        return KVCache(self.cfg.depth, batch, self.cfg.heads, max_len or self.cfg.max_len + 1, self.cfg.head_dim,
                       device=device or ref.device, dtype=dtype or ref.dtype)

    def prefill(self, labels: Tensor, cache: KVCache) -> Logits:
        """Run the class tokens labels (B,) into an empty cache; return logits for x_0: (B, V) or tuple of (B, V_i)."""
        if cache.length:
            raise ValueError(f"prefill needs an empty cache, it holds {cache.length} slots")
        x = self.cls_embed(labels)[:, None]  # (B, 1, C)
        cos, sin = identity_rope(self.cfg.head_dim, 1, device=x.device)
        h = self._run(x, cos, sin, None, cache)
        cache.advance(1)
        return self._logits(h[:, -1])

    def decode_step(self, ids: Tensor, pos: int | Tensor, cache: KVCache, rows: Tensor | None = None,
                    cols: Tensor | None = None) -> Logits:
        """Feed one token per sequence and return the next token's logits: (B, V) or a tuple of (B, V_i).

        Shapes: ids (B,) full ids; pos int or (B,): the grid slot of ids, whose 2D position is (rows[pos], cols[pos]);
        rows, cols (N,) or (B, N), raster over max_len by default.
        """
        B = ids.shape[0]
        rows, cols = self._positions(rows, cols, ids.device)
        slot = torch.as_tensor(pos, device=ids.device).expand(B)  # (B,)
        if rows.dim() == 1:
            r, c = rows[slot], cols[slot]
        else:
            r, c = rows.gather(1, slot[:, None])[:, 0], cols.gather(1, slot[:, None])[:, 0]
        cos, sin = rope_2d(self.cfg.head_dim, r[:, None], c[:, None], self.cfg.rope_base)  # (B, 1, D/2)
        h = self._run(self._embed_tokens(ids[:, None]), cos, sin, None, cache)
        cache.advance(1)
        return self._logits(h[:, -1])
