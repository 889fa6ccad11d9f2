"""Stage-2 generators on the GPT backbone, registered by name: `llamagen`, `mergear`, `randar`."""

from .base import GENERATORS, Generator, Sampled, build_generator, first_occurrence
from .mergear import (
    MergeAR, PositionCache, analytic_peak_slots, live_slots, mean_context, mergear_mask, plain_peak_slots,
)
from .noise import SampleNoise
from .randar import RandAR, default_steps
from .raster import LlamaGen, RasterDecoder, RasterGenerator, group_by_id
from .sampling import SamplingSettings, cfg_scale_at, draw_from, filter_logits, guide, randar_schedule, sample_from

__all__ = [
    "GENERATORS", "Generator", "LlamaGen", "MergeAR", "PositionCache", "RandAR", "RasterDecoder", "RasterGenerator",
    "SampleNoise", "Sampled", "SamplingSettings", "analytic_peak_slots", "build_generator", "cfg_scale_at",
    "default_steps", "draw_from", "filter_logits", "first_occurrence", "group_by_id", "guide", "live_slots",
    "mean_context", "mergear_mask", "plain_peak_slots", "randar_schedule", "sample_from",
]
