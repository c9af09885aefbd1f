"""The keys that ``masks_for_sparsity`` ranks by, and counting and bisecting on them.

A weight's key is the int32 bit pattern of its float32 magnitude, which orders like the value,
``-1`` where already pruned: counting keys at or below a key gives the rank a sort would."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_PRUNED_KEY = -1  # below the key of every weight, so already pruned connections go first

_KEY_MAX = np.iinfo(np.int32).max

_KEY_TOP = 0x7F800000  # the key of inf: above every finite magnitude's


def _keys(leaf: jax.Array, prev: jax.Array | None) -> jax.Array:
    """Ranks weights by magnitude as int32: the float32 bits of ``|w|``, ``-1`` where pruned.

    For non-negative floats the bit pattern orders like the value (and ``-0.0`` becomes ``0.0``),
    so counting keys gives the same ranking as sorting the magnitudes, without sorting.
    """
    bits = jax.lax.bitcast_convert_type(jnp.abs(leaf.astype(jnp.float32)), jnp.int32)
    return bits if prev is None else jnp.where(prev, bits, _PRUNED_KEY)


def _count(x: jax.Array, axis: int | None) -> jax.Array:
    """Counts ``True`` entries per layer: a scalar, or one count per slice along ``axis``.

    Groups of 16 along one dimension are summed as uint8 first: XLA on CPU vectorises that
    reduction and fuses it, where an int32 sum over everything runs about 4x slower and first
    writes the bools out as int32 (4 bytes per weight). A dimension of a multiple of 256 is
    split (so the outer part stays shardable as before); else the last one of 16 or more, its
    remainder (under 16 per row) counted apart.
    """
    others = [d for d in range(x.ndim) if d != axis]
    split = next((d for d in others if x.shape[d] % 256 == 0), None)
    if split is None:
        split = next((d for d in reversed(others) if x.shape[d] >= 16), None)
    if split is None:
        return jnp.sum(x, axis=tuple(others), dtype=jnp.int32)
    size = x.shape[split]
    whole = size // 16 * 16
    head = jax.lax.slice_in_dim(x, 0, whole, axis=split)
    head = head.reshape(*x.shape[:split], whole // 16, 16, *x.shape[split + 1 :])
    partial = jnp.sum(head, axis=split + 1, dtype=jnp.uint8)
    if partial.ndim - 1 != axis and partial.shape[-1] % 8 == 0:
        # And groups of 8 of those along the minor dimension (at most 128: still uint8), in the
        # same fused loop: XLA on CPU writes the partial sums out widened to int32 for the last
        # reduction, and so 4 bytes per 128 weights, not per 16 (0.25 bytes per weight was the
        # largest temporary of a ranking under jit).
        partial = partial.reshape(*partial.shape[:-1], partial.shape[-1] // 8, 8)
        partial = jnp.sum(partial, axis=-1, dtype=jnp.uint8)
    count = _sum_small(partial, tuple(others))
    if whole < size:
        tail = jax.lax.slice_in_dim(x, whole, size, axis=split)
        count = count + jnp.sum(tail, axis=tuple(others), dtype=jnp.int32)
    return count


_EXACT_ROW = 1 << 16  # 255 * 2**16 < 2**24: a float32 sum of this many small counts is exact


def _sum_small(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Exact int32 sums over ``axes`` of counts of at most 255 (uint8), never written as int32.

    XLA on CPU writes an integer array out widened before an int32 sum of it (4 bytes per
    entry). A vector's sixteenths are added first as uint16 (a reduction over a major axis,
    vectorised and fused with the widening), then the result. Otherwise rows along the minor
    dimension are summed in float32, the widening inside the fused reduction too: exact while
    each sum stays under 2**24 (rows of at most 2**16 counts). A float32 sum of the whole
    vector, as fused, ran serially: 5-10% slower rankings.
    """
    if x.ndim == 1:
        full = x.shape[0] // 16 * 16
        total = jnp.sum(x[full:], dtype=jnp.int32)
        if full:
            head = jnp.sum(x[:full].reshape(16, -1), axis=0, dtype=jnp.uint16)
            total = total + jnp.sum(head, dtype=jnp.int32)
        return total
    last = x.ndim - 1
    if last not in axes or x.shape[last] > _EXACT_ROW:
        return jnp.sum(x, axis=axes, dtype=jnp.int32)
    rows = jnp.sum(x, axis=last, dtype=jnp.float32).astype(jnp.int32)
    return jnp.sum(rows, axis=tuple(a for a in axes if a != last), dtype=jnp.int32)


def _column(t: jax.Array, ndim: int, axis: int | None) -> jax.Array:
    """Reshapes per-slice values (shape ``(n,)``) to broadcast along ``axis``; scalars as they are."""
    if axis is None:
        return t
    shape = [1] * ndim
    shape[axis] = t.shape[0]
    return t.reshape(shape)


def _bisect(count_at, lo: jax.Array, hi: jax.Array, target: jax.Array) -> jax.Array:
    """The smallest ``t`` in ``(lo, hi]`` with ``count_at(t) >= target``, elementwise.

    ``count_at`` must be non-decreasing; ``count_at(lo) < target <= count_at(hi)`` is assumed
    (where it fails, the answer is ``lo + 1`` or ``hi``). About ``log2(hi - lo)`` evaluations.
    """

    def body(bounds):
        lo, hi = bounds
        mid = (lo & hi) + ((lo ^ hi) >> 1)  # floor((lo + hi) / 2) without int32 overflow
        enough = count_at(mid) >= target
        return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

    def wider(bounds):
        lo, hi = bounds
        return jnp.any(hi > lo + 1)  # not hi - lo: that overflows int32

    return jax.lax.while_loop(wider, body, (lo, hi))[1]
