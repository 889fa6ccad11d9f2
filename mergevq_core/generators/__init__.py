"""Stage-2 generators on the GPT backbone, registered by name: `llamagen`, `mergear`, `randar`."""

from .base import GENERATORS, Generator, Sampled, build_generator, first_occurrence
from .randar import RandAR, default_steps
from .raster import LlamaGen, MergeAR, analytic_peak_slots, group_by_id, mergear_mask, plain_peak_slots
from .sampling import SamplingSettings, cfg_scale_at, filter_logits, guide, randar_schedule, sample_from

__all__ = [
    "GENERATORS", "Generator", "LlamaGen", "MergeAR", "RandAR", "Sampled", "SamplingSettings", "analytic_peak_slots",
    "build_generator", "cfg_scale_at", "default_steps", "filter_logits", "first_occurrence", "group_by_id", "guide",
    "mergear_mask", "plain_peak_slots", "randar_schedule", "sample_from",
]
