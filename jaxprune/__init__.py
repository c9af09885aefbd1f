"""jaxprune: Han et al. 2015 magnitude pruning for JAX, Flax and optax."""

from jaxprune.masks import (
    LayerSummary,
    Summary,
    apply_masks,
    compute_masks,
    masks_for_sparsity,
    summarize,
)
from jaxprune.storage import FORMAT_VERSION, FileFormatError, LeafReport, SaveReport, load, save

__all__ = [
    "FORMAT_VERSION",
    "FileFormatError",
    "LayerSummary",
    "LeafReport",
    "SaveReport",
    "Summary",
    "apply_masks",
    "compute_masks",
    "load",
    "masks_for_sparsity",
    "save",
    "summarize",
]
