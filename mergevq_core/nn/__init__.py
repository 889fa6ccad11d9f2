"""Reusable layers with no MergeVQ knowledge (timm's `layers/` idea)."""

from .blocks import Attention, CrossAttention, LayerScale, Mlp, MixFFN, ResBlock, group_norm
from .upsample import DepthToSpaceUpsample

__all__ = ["Attention", "CrossAttention", "DepthToSpaceUpsample", "LayerScale", "Mlp", "MixFFN", "ResBlock", "group_norm"]
