"""MergeVQ encoder: a CNN stem (G, G+R) or a patchify stem (R), then a ViT whose every block merges tokens.

Shape letters: B batch, N original tokens (grid²), K kept tokens, T current tokens (incl. cls), C width,
D code bits.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..config import EncoderConfig
from ..nn import Attention, LayerScale, Mlp, ResBlock, group_norm
from ..tome import bipartite_match, canonical_order, initial_assign, merge_wavg, proportional_attention_bias, track_assign


class MergeState(NamedTuple):
    """What merging carries between blocks. size (B, T, 1) or None before the first merge; assign (B, N):
    the current position of the token that holds each original token (cls at position 0)."""

    size: Tensor | None
    assign: Tensor


class EncoderOut(NamedTuple):
    tokens: Tensor  # (B, K, C) merged tokens in canonical order (by the smallest raster position covered)
    cls: Tensor  # (B, C) cls token after the last block
    assign: Tensor  # (B, N) long in [0, K): canonical slot of every original token
    size: Tensor  # (B, K) how many original tokens each slot holds


class ToMeBlock(nn.Module):
    """Pre-LN ViT block that merges r tokens between attention and MLP (ToMe; paper Eq. 13-14)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, layer_scale: float, prop_attn: bool,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.prop_attn = prop_attn
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale)
        self.drop_path: nn.Module = nn.Identity()  # stochastic depth, set by `MergeEncoder.set_drop_path`

    def forward(self, x: Tensor, state: MergeState, r: int) -> tuple[Tensor, MergeState]:
        bias = proportional_attention_bias(state.size) if self.prop_attn else None
        h, keys = self.attn(self.norm1(x), bias)  # keys: (B, T, C/H)
        x = x + self.drop_path(self.ls1(h))
        if r > 0:
            plan = bipartite_match(keys, r, protect_cls=True)
            x, size = merge_wavg(plan, x, state.size)  # (B, T-r, C)
            state = MergeState(size, track_assign(plan, state.assign))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x, state


class HybridStem(nn.Module):
    """MAGVIT-v2 CNN: conv_in, then per stage ResBlocks and a stride-2 conv (not after the last stage)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        c_in = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            c_out = cfg.ch * mult
            for j in range(cfg.num_res_blocks):
                layers.append(ResBlock(c_in if j == 0 else c_out, c_out))
            c_in = c_out
            if i < len(cfg.ch_mult) - 1:
                layers.append(nn.Conv2d(c_out, c_out, 3, stride=2, padding=1))
        self.stages = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, C, H/ds, W/ds)
        return self.stages(self.conv_in(x))


class PatchStem(nn.Module):
    """ViT patchify conv followed by a per-channel GroupNorm over positions (release R encoder)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.norm = nn.GroupNorm(cfg.dim, cfg.dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv_in(x))


def sincos_grid_embedding(h: int, w: int, dim: int, device: torch.device | str | None = None) -> Tensor:
    """Fixed 2D sin-cos embedding (h*w, dim) of a raster grid (MAE-style: half the channels encode the row,
    half the column, frequencies 1/10000^(i/F)); zero-padded when dim is not a multiple of 4."""
    n_freq = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(n_freq, device=device, dtype=torch.float32) / max(n_freq, 1))  # (F,)
    yy, xx = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    ang_y, ang_x = yy.flatten()[:, None] * omega, xx.flatten()[:, None] * omega  # (h*w, F)
    emb = torch.cat([ang_y.sin(), ang_y.cos(), ang_x.sin(), ang_x.cos()], dim=1)  # (h*w, 4F)
    return F.pad(emb, (0, dim - emb.shape[1]))


class MergeEncoder(nn.Module):
    """Images → K merged tokens in canonical order, their cls token and the source `assign`. `norm_eps`: the
    blocks' LayerNorm eps (`model.norm_eps`)."""

    def __init__(self, cfg: EncoderConfig, prop_attn: bool = True, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem = HybridStem(cfg) if cfg.kind == "hybrid" else PatchStem(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = cfg.pos_embed  # the release has none
        self.blocks = nn.ModuleList(
            ToMeBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.layer_scale, prop_attn, norm_eps) for _ in range(cfg.depth)
        )

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth rising linearly from 0 at the first block to `rate` at the last (fine-tuning); 0 removes
        it. Holds no parameters: checkpoints are unchanged."""
        from timm.layers import DropPath

        n = len(self.blocks)
        for i, block in enumerate(self.blocks):
            p = rate * i / max(1, n - 1)
            block.drop_path = DropPath(p) if p > 0 else nn.Identity()

    def forward(self, images: Tensor, schedule: list[int] | tuple[int, ...]) -> EncoderOut:
        """Shapes: images (B, 3, H, W) in [-1, 1]; schedule: merges per block, Σ = N - K."""
        assert len(schedule) == len(self.blocks), f"schedule has {len(schedule)} entries for {len(self.blocks)} blocks"
        feats = self.stem(images)  # (B, C, h, w)
        x = rearrange(feats, "b c h w -> b (h w) c")  # (B, N, C)
        b, n, _ = x.shape
        if self.pos_embed == "sincos":
            x = x + sincos_grid_embedding(feats.shape[2], feats.shape[3], x.shape[-1], x.device).to(x.dtype)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)  # (B, 1+N, C)
        state = MergeState(None, initial_assign(b, n, has_cls=True, device=x.device))
        for block, r in zip(self.blocks, schedule):
            x, state = block(x, state, r)
        k = x.shape[1] - 1
        perm, assign = canonical_order(state.assign, k, offset=1)  # perm (B, K) into x[:, 1:]
        tokens = x[:, 1:].gather(1, perm[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, C)
        size = torch.ones(b, k, device=x.device) if state.size is None else state.size[:, 1:, 0].gather(1, perm)
        return EncoderOut(tokens, x[:, 0], assign, size)


class CodeProjection(nn.Module):
    """GN → SiLU → 1×1 conv from the encoder width to the D code bits, applied token-wise
    (the release runs it on a √K×√K pseudo-grid; GroupNorm statistics and a 1×1 conv do not see the layout)."""

    def __init__(self, dim: int, code_dim: int) -> None:
        super().__init__()
        self.norm = group_norm(dim)
        self.proj = nn.Linear(dim, code_dim)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, K, C) -> (B, K, D)
        h = self.norm(tokens.transpose(1, 2)).transpose(1, 2)
        return self.proj(F.silu(h))


class AlignHead(nn.Module):
    """cls token → teacher-width "logits" for the global alignment loss (paper Eq. 10)."""

    def __init__(self, dim: int, out_dim: int, kind: str) -> None:
        super().__init__()
        hidden = 4 * dim
        if kind == "layer2":
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, out_dim))
        elif kind == "layer3":
            self.net = nn.Sequential(
                nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out_dim)
            )
        else:
            raise ValueError(f"unknown align head {kind!r}")

    def reset_parameters(self) -> None:
        """PyTorch's default Linear init, not the encoder's trunc_normal(0.02): the head must start with O(1)
        outputs, or a DINO-style teacher of the same init gives a uniform target and no gradient."""
        for m in self.net:
            if isinstance(m, (nn.Linear, nn.LayerNorm)):
                m.reset_parameters()

    def forward(self, cls: Tensor) -> Tensor:  # (B, C) -> (B, out_dim)
        return self.net(cls)
