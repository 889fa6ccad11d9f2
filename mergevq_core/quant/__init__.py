"""Lookup-free quantisation and its exact entropy regularisers."""

from .entropy import (
    bit_log_probs,
    codebook_entropy,
    codebook_probs,
    entropy_of,
    per_sample_entropy,
)
from .lfq import LFQ, QuantOut, codes_to_indices, indices_to_codes

__all__ = [
    "LFQ",
    "QuantOut",
    "codes_to_indices",
    "indices_to_codes",
    "bit_log_probs",
    "per_sample_entropy",
    "codebook_probs",
    "codebook_entropy",
    "entropy_of",
]
