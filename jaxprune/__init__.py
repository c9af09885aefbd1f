"""jaxprune: Han et al. 2015 magnitude pruning for JAX, Flax and optax."""

from jaxprune.masks import (
    LayerSummary,
    Summary,
    apply_masks,
    compute_masks,
    masks_for_sparsity,
    summarize,
)

__all__ = [
    "LayerSummary",
    "Summary",
    "apply_masks",
    "compute_masks",
    "masks_for_sparsity",
    "summarize",
]
