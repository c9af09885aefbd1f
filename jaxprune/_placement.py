"""Where the optimizer state's masks live: checked against the params, placed like them, swapped.

The transformations keep masks in their state; these helpers make that state's masks pure boolean
arrays, sharded like their params from ``init`` on, and give replacement masks the old ones'
dtype and placement so a jitted step does not recompile.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune._options import is_traced
from jaxprune._tree import PyTree, check_mask_leaves, check_masks, is_array, leaves_with_paths


def pure(tree: PyTree) -> PyTree:
    # NNX Variables (Param, OptState) wrap arrays; comparing pure arrays lets masks made from an
    # nnx.State match the plain arrays nnx.Optimizer hands to optax, and the other way round.
    return nnx.as_pure(tree)


def as_mask_tree(masks: PyTree, *, name: str) -> PyTree:
    """Validates mask dtypes and returns the masks as pure boolean JAX arrays (a new tree)."""
    check_mask_leaves(pure(masks), name=name)
    return jax.tree.map(lambda m: jnp.asarray(m) if is_array(m) else m, pure(masks))


def placed_like_params(masks: PyTree, params: PyTree) -> PyTree:
    """Checks masks against the params and moves uncommitted ones to their leaf's sharding.

    A mask that is already committed must match its leaf's sharding (:func:`check_masks`
    raises otherwise); one that is not (built from NumPy or on the default device) is put
    where its leaf is, so the state's masks are sharded like the params from ``init`` on.
    """
    check_masks(params, masks)

    def place(m: Any, p: Any) -> Any:
        if (
            isinstance(p, jax.Array)
            and not is_traced(p)
            and p.committed
            and isinstance(m, jax.Array)
            and not is_traced(m)
            and not m.committed
        ):
            return jax.device_put(m, p.sharding)
        return m

    return jax.tree.map(place, masks, params)


@jax.jit
def _nonfinite_pruned(mask: jax.Array, leaf: jax.Array) -> jax.Array:
    # One compiled function per shape (eagerly, each of the four ops would compile on its own).
    return jnp.any(~mask & ~jnp.isfinite(leaf))


def check_pruned_finite(masks: PyTree, params: PyTree) -> None:
    # keep_pruned zeroes a pruned weight w with the update -w; for w = inf that gives NaN.
    checked = {
        path: _nonfinite_pruned(m, p)
        for (path, m), p in zip(leaves_with_paths(masks), jax.tree.leaves(params), strict=True)
        if m is not True and is_inexact_array(p) and not is_traced(p) and not is_traced(m)
    }
    for path, bad in zip(checked, jax.device_get(list(checked.values())), strict=True):
        if bad:  # all leaves fetched at once, the first bad one in flattening order named
            raise ValueError(
                f"params[{path!r}] has NaN or inf at pruned positions; keep_pruned sends a pruned "
                "weight w to zero with the update -w, and inf - inf is NaN. Zero the pruned "
                "weights first: params = jaxprune.apply_masks(params, masks)."
            )


def is_inexact_array(x: Any) -> bool:
    return is_array(x) and jnp.issubdtype(x.dtype, jnp.inexact)


def regrown(old: PyTree, new: PyTree) -> list[tuple[str, int]]:
    """Lists ``(path, count)`` of connections pruned in ``old`` but kept in ``new``."""
    counts = {}
    for (path, o), n in zip(leaves_with_paths(old), jax.tree.leaves(new), strict=True):
        if not is_array(o):
            continue
        if is_traced(o) or is_traced(n):
            raise TypeError(
                "update_masks checks that new_masks only prune further, which needs concrete "
                "masks; call it outside jax.jit, or pass allow_regrow=True to skip the check."
            )
        counts[path] = _regrown_count(n, o)
    # Sharded reductions and one fetch of their scalars: no mask is gathered.
    fetched = jax.device_get(list(counts.values()))
    return [(path, int(c)) for path, c in zip(counts, fetched, strict=True) if c]


@jax.jit
def _regrown_count(new: jax.Array, old: jax.Array) -> jax.Array:
    return jnp.sum(jnp.asarray(new, bool) & ~jnp.asarray(old, bool), dtype=jnp.int32)


def placed_like(new: Any, old: Any) -> Any:
    # Same dtype, placement and commitment as the old leaf, so a jitted step sees an identical
    # signature: jit keys its cache on whether an argument is committed to a device, so a
    # committed mask in a state that tx.init left uncommitted would compile the step again.
    if not is_array(new):
        return new
    new = jnp.asarray(new, dtype=old.dtype if is_array(old) else bool)
    if isinstance(old, jax.Array) and not is_traced(old):
        if old.committed:
            new = jax.device_put(new, old.sharding)
        elif isinstance(new, jax.Array) and new.committed and len(new.sharding.device_set) == 1:
            new = jnp.asarray(np.asarray(new))  # an uncommitted copy of a single-device mask
    return new


def reset_like(leaf: Any, value: Any) -> Any:
    (old,), treedef = jax.tree.flatten(leaf)  # keeps NNX's Variable wrapper
    new = placed_like(np.full(old.shape, value, old.dtype), old)
    return jax.tree.unflatten(treedef, [new])
