"""The exact ranking behind ``masks_for_sparsity``: the ``k`` smallest magnitudes, without sorting.

Each weight's key is the int32 bit pattern of its float32 magnitude (which orders like the value),
``-1`` where already pruned; bisection on counts finds the threshold key (on large layers starting
from the bracket that two quantiles of a strided sample give, checked by one counting pass), then
a second bisection on position splits the ties at it, so the result is the stable sort's (earlier
entry pruned first) while only reductions run: sharded leaves stay sharded.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_PRUNED_KEY = -1  # below the key of every weight, so already pruned connections go first
_KEY_MAX = np.iinfo(np.int32).max
_KEY_TOP = 0x7F800000  # the key of inf: above every finite magnitude's
_SAMPLE_FROM = 2**16  # ranked slices at least this large start from a sample's quantiles
_SAMPLE_MAX = 2**16


def _keys(leaf: jax.Array, prev: jax.Array | None) -> jax.Array:
    """Ranks weights by magnitude as int32: the float32 bits of ``|w|``, ``-1`` where pruned.

    For non-negative floats the bit pattern orders like the value (and ``-0.0`` becomes ``0.0``),
    so counting keys gives the same ranking as sorting the magnitudes, without sorting.
    """
    bits = jax.lax.bitcast_convert_type(jnp.abs(leaf.astype(jnp.float32)), jnp.int32)
    return bits if prev is None else jnp.where(prev, bits, _PRUNED_KEY)


def _positions(shape: tuple[int, ...], axis: int | None) -> jax.Array:
    """Row-major index of every entry within its layer (within its slice for a stacked leaf)."""
    pos, stride = jnp.zeros(shape, jnp.int32), 1
    for d in reversed(range(len(shape))):
        if d != axis:
            pos = pos + jax.lax.broadcasted_iota(jnp.int32, shape, d) * stride
            stride *= shape[d]
    return pos


def _count(x: jax.Array, axis: int | None) -> jax.Array:
    """Counts ``True`` entries per layer: a scalar, or one count per slice along ``axis``.

    Where a dimension splits into groups of 16, those are summed as uint8 first: XLA on CPU
    vectorises that reduction and not an int32 one over everything (about 4x faster). Only
    dimensions of a multiple of 256 are split, so the outer part stays shardable as before.
    """
    others = [d for d in range(x.ndim) if d != axis]
    split = next((d for d in others if x.shape[d] % 256 == 0), None)
    if split is not None:
        x = x.reshape(*x.shape[:split], x.shape[split] // 16, 16, *x.shape[split + 1 :])
        x = jnp.sum(x, axis=split + 1, dtype=jnp.uint8)  # same rank and axis as before
    return jnp.sum(x, axis=tuple(others), dtype=jnp.int32)


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


def _sample_keys(
    leaves: tuple[jax.Array, ...],
    prevs: tuple[jax.Array | None, ...],
    axis: int | None,
    size: int,
) -> jax.Array:
    """Keys of a strided sample of about ``size`` entries per ranked slice, sorted: ``(slices, m)``."""
    total = sum(math.prod(x.shape) for x in leaves)
    parts = []
    for x, p in zip(leaves, prevs, strict=True):
        dims = [d for d in range(x.ndim) if d != axis]
        n = math.prod(x.shape[d] for d in dims)
        want = max(1, size * math.prod(x.shape) // total)
        step = max(1, math.floor((n / want) ** (1 / max(len(dims), 1))))
        index = tuple(slice(None) if d == axis else slice(None, None, step) for d in range(x.ndim))
        key = _keys(x[index], None if p is None else p[index])
        key = key.reshape(1, -1) if axis is None else jnp.moveaxis(key, axis, 0)
        parts.append(key.reshape(key.shape[0], -1))
    return jnp.sort(jnp.concatenate(parts, axis=1), axis=1)


class _Bracket(NamedTuple):
    """Keys with ``count(lo) < target <= count(hi)``, and those counts, elementwise."""

    lo: jax.Array
    hi: jax.Array
    count_lo: jax.Array
    count_hi: jax.Array


def _narrowed(b: _Bracket, a, c, count_pair, target: jax.Array) -> _Bracket:
    """The bracket after counting at keys ``lo < a <= c < hi`` (kept where already adjacent)."""
    count_a, count_c = count_pair(a, c)
    above, inside = count_c < target, count_a < target
    new = _Bracket(
        jnp.where(above, c, jnp.where(inside, a, b.lo)),
        jnp.where(above, b.hi, jnp.where(inside, c, a)),
        jnp.where(above, count_c, jnp.where(inside, count_a, b.count_lo)),
        jnp.where(above, b.count_hi, jnp.where(inside, count_c, count_a)),
    )
    done = b.hi <= b.lo + 1
    return _Bracket(*(jnp.where(done, old, x) for old, x in zip(b, new, strict=True)))


def _interpolated(b: _Bracket, count_pair, target: jax.Array) -> _Bracket:
    """Counts at two keys around the linear interpolation of the counts at the bracket's ends.

    Where the magnitudes' distribution is smooth, the target's rank is off the line by its
    curvature (allowed for as 3% of the entries in the bracket) and a few standard deviations:
    the bracket shrinks about 16-fold per pass, against 4-fold for two bisection steps.
    """
    width = b.hi - b.lo  # fits int32: keys lie in [-2, _KEY_TOP]
    k = jnp.maximum(b.count_hi - b.count_lo, 1).astype(jnp.float32)
    w = width.astype(jnp.float32)
    at = (target - b.count_lo).astype(jnp.float32) / k * w
    spread = w * (3.0 * jnp.sqrt(k) + 2.0 + 0.03 * k) / k

    def key_at(offset):
        return b.lo + jnp.clip(jnp.clip(offset, 1.0, w).astype(jnp.int32), 1, width - 1)

    a = key_at(at - spread)
    return _narrowed(b, a, jnp.maximum(a, key_at(at + spread)), count_pair, target)


def _start(
    leaves: tuple[jax.Array, ...],
    prevs: tuple[jax.Array | None, ...],
    axis: int | None,
    n: int,
    target: jax.Array,
    count_pair,
) -> tuple[jax.Array, jax.Array]:
    """Keys ``(lo, hi)`` with ``count(lo) < target <= count(hi)``, elementwise.

    The whole key range, narrowed where ``n`` is large by one counting pass at two keys of a
    strided sample, a few standard deviations of its rank either side of the target quantile
    (about 12 fewer bisection passes on smooth data, none lost when the sample misleads), then
    by two interpolation passes (about 4 fewer bisection passes again on 2**20 weights).
    """
    b = _Bracket(
        jnp.full(target.shape, _PRUNED_KEY - 1, jnp.int32),
        jnp.full(target.shape, _KEY_TOP, jnp.int32),
        jnp.zeros(target.shape, jnp.int32),
        jnp.full(target.shape, n, jnp.int32),
    )
    if n < _SAMPLE_FROM:
        return b.lo, b.hi
    sample = _sample_keys(leaves, prevs, axis, min(_SAMPLE_MAX, 8 * math.isqrt(n)))
    m = sample.shape[1]
    p = jnp.clip(target.astype(jnp.float32) / n, 0.0, 1.0)
    margin = 4.0 * jnp.sqrt(m * p * (1.0 - p)) + 2.0
    at = jnp.stack([p * m - margin, p * m + margin], -1)
    at = jnp.clip(at, 0, m - 1).astype(jnp.int32).reshape(-1, 2)
    ac = jnp.take_along_axis(sample, at, axis=1).reshape(*target.shape, 2)
    # a <= c (the sample is sorted), both in the whole range: the bracket's ends are never hit.
    b = _narrowed(b, ac[..., 0], ac[..., 1], count_pair, target)
    for _ in range(2):
        b = _interpolated(b, count_pair, target)
    return b.lo, b.hi


def _ranked_keep(
    leaves: tuple[jax.Array, ...],
    prevs: tuple[jax.Array | None, ...],
    axes: tuple[int | None, ...],
    n_pruned: jax.Array,
) -> tuple[jax.Array, ...]:
    """Keeps all but the ``n_pruned`` lowest-ranked entries of the leaves taken together.

    The rank is ``(key, leaf, position)``: magnitude first, then flattening order. With one leaf
    and an ``axis``, every slice along it is ranked on its own (``n_pruned`` per slice). Found by
    bisection on counts (the threshold key, then the position cut among the entries equal to
    it), so nothing is sorted and sharded leaves need only reductions.
    """
    keys = [_keys(x, p) for x, p in zip(leaves, prevs, strict=True)]

    def count_at(t, compare):
        # Keys recomputed per pass behind a barrier tied to t: hoisted out of the loop, XLA
        # would keep int32 keys of every leaf alive (4 more bytes per parameter).
        xs, ps, t = jax.lax.optimization_barrier((leaves, prevs, t))
        return sum(
            _count(compare(_keys(x, p), _column(t, x.ndim, a)), a)
            for x, p, a in zip(xs, ps, axes, strict=True)
        )

    def count_pair(a, c):
        xs, ps, a, c = jax.lax.optimization_barrier((leaves, prevs, a, c))
        counts = [
            (
                _count(key <= _column(a, x.ndim, ax), ax),
                _count(key <= _column(c, x.ndim, ax), ax),
            )
            for key, x, ax in ((_keys(x, p), x, ax) for x, p, ax in zip(xs, ps, axes, strict=True))
        ]
        return sum(ca for ca, _ in counts), sum(cc for _, cc in counts)

    axis = axes[0] if len(leaves) == 1 else None
    n = sum(math.prod(x.shape) for x in leaves) // (1 if axis is None else leaves[0].shape[axis])
    lo, hi = _start(leaves, prevs, axis, n, n_pruned, count_pair)
    threshold = _bisect(lambda t: count_at(t, jnp.less_equal), lo, hi, n_pruned)
    # One pass for both: the entries below the threshold and the ties at it, per leaf.
    xs, ps, t = jax.lax.optimization_barrier((leaves, prevs, threshold))
    key_ts = [(_keys(x, p), _column(t, x.ndim, a)) for x, p, a in zip(xs, ps, axes, strict=True)]
    tie_counts = [_count(k == kt, a) for (k, kt), a in zip(key_ts, axes, strict=True)]
    below = sum(_count(k < kt, a) for (k, kt), a in zip(key_ts, axes, strict=True))
    need = n_pruned - below  # entries equal to the threshold still to prune, in rank order
    out = []
    for x, p, key, axis, ties in zip(leaves, prevs, keys, axes, tie_counts, strict=True):
        take = jnp.clip(need, 0, ties)
        need = need - take
        size = math.prod(key.shape) // (1 if axis is None else key.shape[axis])
        # The position cut: the first `take` ties (in position order) are pruned. Searched only
        # where some tie is pruned and some kept; otherwise it is 0 or past every entry.
        partial = (take > 0) & (take < ties)
        hi = jnp.where(take == 0, 0, size)
        cut = jax.lax.cond(
            jnp.any(partial),
            functools.partial(_tie_cut, x, p, threshold, axis, partial, hi, take),
            lambda hi=hi: hi,
        )
        t = _column(threshold, key.ndim, axis)
        pos = _positions(key.shape, axis)
        pruned = (key < t) | ((key == t) & (pos < _column(cut, key.ndim, axis)))
        out.append(~pruned)
    return tuple(out)


def _tie_cut(x, prev, threshold, axis, partial, hi, take) -> jax.Array:
    """The smallest position ``c`` with ``take`` ties before it, where ``partial``; else ``hi``."""

    def count_before(c):
        xs, ps, t, c = jax.lax.optimization_barrier((x, prev, threshold, c))
        key = _keys(xs, ps)
        tied = key == _column(t, key.ndim, axis)
        return _count(tied & (_positions(key.shape, axis) < _column(c, key.ndim, axis)), axis)

    return _bisect(count_before, jnp.where(partial, -1, hi - 1), hi, take)


ranked_keep = jax.jit(_ranked_keep, static_argnames="axes")


def check_countable(what: str, n: int) -> None:
    if n > _KEY_MAX:
        raise ValueError(
            f"{what} rank {n:,} weights together; masks_for_sparsity counts in int32, so at "
            f"most {_KEY_MAX:,}. Use scope='layer', or stacked= to rank a leaf per slice."
        )
