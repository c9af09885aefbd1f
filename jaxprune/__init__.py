"""jaxprune: Han et al. 2015 magnitude pruning for JAX, Flax and optax.

Masks from parameters (:func:`compute_masks`; N:M patterns with :func:`nm_masks`), retraining
that keeps pruned weights at zero (:func:`keep_pruned`, :func:`prune_and_retrain`), sparse export
and inference (:func:`to_bcoo`, :func:`sparse_apply`), compact files (:func:`save`, :func:`load`)
and physically smaller layers (:func:`shrink`, :func:`neuron_masks`).
"""

from jaxprune._tree import default_where, excluding, paths_matching, weights_named
from jaxprune.batch_stats import reestimate_batch_stats
from jaxprune.masks import (
    LayerSummary,
    Summary,
    apply_masks,
    compute_masks,
    masks_for_sparsity,
    summarize,
)
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
from jaxprune.transform import (
    KeepPrunedState,
    PruneGradientsState,
    keep_pruned,
    prune_gradients,
    raise_if_misplaced,
    update_masks,
)

__all__ = [
    "FORMAT_VERSION",
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
