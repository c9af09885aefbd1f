"""jaxprune: Han et al. 2015 magnitude pruning for JAX, Flax and optax.

Masks from parameters (:func:`compute_masks`; N:M patterns with :func:`nm_masks`), retraining
that keeps pruned weights at zero (:func:`keep_pruned`, :func:`prune_and_retrain`), sparse export
and inference (:func:`to_bcoo`, :func:`sparse_apply`), compact files (:func:`save`, :func:`load`)
and physically smaller layers (:func:`shrink`, :func:`neuron_masks`).
"""

# The names load on first use (PEP 562), so `import jaxprune` and the `jaxprune` command start
# at once: jax itself loads only when something needs it, and a Ctrl-C in the first seconds of
# the command reaches its handler instead of interrupting the import of jax here.

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxprune._tree import default_where, excluding, paths_matching, weights_named
    from jaxprune.batch_stats import reestimate_batch_stats
    from jaxprune.batches import ArrayBatches
    from jaxprune.masks import apply_masks, compute_masks, masks_for_sparsity
    from jaxprune.nm import nm_masks, nm_pattern, nm_patterns
    from jaxprune.retrain import (
        RetrainState,
        connection_counts,
        dropout_rate,
        make_retrain_step,
        nnx_loss,
        retrain_dropout_rates,
        retrain_state,
    )
    from jaxprune.rounds import RoundRecord, RoundsState, prune_and_retrain
    from jaxprune.sparse import SparseApply, sparse_apply, to_bcoo, to_dense
    from jaxprune.storage import FORMAT_VERSION, FileFormatError, LeafReport, SaveReport, load, save
    from jaxprune.structured import LayerShrink, ShrinkReport, Shrunk, neuron_masks, shrink
    from jaxprune.summary import LayerSummary, Summary, summarize
    from jaxprune.transform import (
        KeepPrunedState,
        PruneGradientsState,
        keep_pruned,
        prune_gradients,
        raise_if_misplaced,
        update_masks,
    )

_HOMES = {
    "jaxprune._tree": ("default_where", "excluding", "paths_matching", "weights_named"),
    "jaxprune.batch_stats": ("reestimate_batch_stats",),
    "jaxprune.batches": ("ArrayBatches",),
    "jaxprune.masks": ("apply_masks", "compute_masks", "masks_for_sparsity"),
    "jaxprune.nm": ("nm_masks", "nm_pattern", "nm_patterns"),
    "jaxprune.retrain": (
        "RetrainState",
        "connection_counts",
        "dropout_rate",
        "make_retrain_step",
        "nnx_loss",
        "retrain_dropout_rates",
        "retrain_state",
    ),
    "jaxprune.rounds": ("RoundRecord", "RoundsState", "prune_and_retrain"),
    "jaxprune.sparse": ("SparseApply", "sparse_apply", "to_bcoo", "to_dense"),
    "jaxprune.storage": (
        "FORMAT_VERSION",
        "FileFormatError",
        "LeafReport",
        "SaveReport",
        "load",
        "save",
    ),
    "jaxprune.structured": ("LayerShrink", "ShrinkReport", "Shrunk", "neuron_masks", "shrink"),
    "jaxprune.summary": ("LayerSummary", "Summary", "summarize"),
    "jaxprune.transform": (
        "KeepPrunedState",
        "PruneGradientsState",
        "keep_pruned",
        "prune_gradients",
        "raise_if_misplaced",
        "update_masks",
    ),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "FORMAT_VERSION",
    "ArrayBatches",
    "FileFormatError",
    "KeepPrunedState",
    "LayerShrink",
    "LayerSummary",
    "LeafReport",
    "PruneGradientsState",
    "RetrainState",
    "RoundRecord",
    "RoundsState",
    "SaveReport",
    "ShrinkReport",
    "Shrunk",
    "SparseApply",
    "Summary",
    "apply_masks",
    "compute_masks",
    "connection_counts",
    "default_where",
    "dropout_rate",
    "excluding",
    "keep_pruned",
    "load",
    "make_retrain_step",
    "masks_for_sparsity",
    "neuron_masks",
    "nm_masks",
    "nm_pattern",
    "nm_patterns",
    "nnx_loss",
    "paths_matching",
    "prune_and_retrain",
    "prune_gradients",
    "raise_if_misplaced",
    "reestimate_batch_stats",
    "retrain_dropout_rates",
    "retrain_state",
    "save",
    "shrink",
    "sparse_apply",
    "summarize",
    "to_bcoo",
    "to_dense",
    "update_masks",
    "weights_named",
]


def __getattr__(name: str) -> object:
    """Imports a public name from its module the first time it is asked for."""
    if name not in _HOME_OF:
        raise AttributeError(f"module 'jaxprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
