"""Mixtures: ratio -> per-domain counts (largest remainder), and IF-weighted / uniform /
remove-harmful sampling of k mixtures inside jit."""

from duet_jax.mixture.counts import (
                                       apply_min_share,
                                       cap_ratio,
                                       largest_remainder,
                                       ratio_to_counts,
                                       share_caps,
                                       validate_ratio,
)
from duet_jax.mixture.sampling import (
                                       effective_sample_size,
                                       if_weights,
                                       remove_harmful_weights,
                                       sample_mixture,
                                       sample_mixtures,
                                       uniform_weights,
)

__all__ = [
    "apply_min_share", "cap_ratio", "effective_sample_size", "if_weights", "largest_remainder", "ratio_to_counts",
    "remove_harmful_weights", "sample_mixture", "sample_mixtures", "share_caps", "uniform_weights", "validate_ratio",
]
