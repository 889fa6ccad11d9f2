"""Token merging (bipartite soft matching) and merge schedules for MergeVQ."""
from .matching import (
    MergePlan,
    bipartite_match,
    canonical_assign,
    canonical_order,
    identity_plan,
    initial_assign,
    max_merges,
    merge,
    merge_wavg,
    proportional_attention_bias,
    source_matrix,
    track_assign,
)
from .schedule import (
    KeepSampler,
    is_perfect_square,
    keep_candidates,
    layer_cap,
    max_total_merges,
    merge_schedule,
)

__all__ = [
    "KeepSampler",
    "MergePlan",
    "bipartite_match",
    "canonical_assign",
    "canonical_order",
    "identity_plan",
    "initial_assign",
    "is_perfect_square",
    "keep_candidates",
    "layer_cap",
    "max_merges",
    "max_total_merges",
    "merge",
    "merge_schedule",
    "merge_wavg",
    "proportional_attention_bias",
    "source_matrix",
    "track_assign",
]
