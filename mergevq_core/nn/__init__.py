"""Reusable layers with no MergeVQ knowledge (timm's `layers/` idea)."""

from .blocks import Attention, CrossAttention, LayerScale, Mlp, MixFFN, ResBlock, SwiGLU, group_norm
from .norm import RMSNorm
from .upsample import DepthToSpaceUpsample

__all__ = [
    "Attention", "CrossAttention", "DepthToSpaceUpsample", "LayerScale", "Mlp", "MixFFN", "RMSNorm", "ResBlock",
    "SwiGLU", "group_norm",
]
