"""The exact ranking behind ``masks_for_sparsity``: the ``k`` smallest magnitudes, without sorting.

Each weight's key is the int32 bit pattern of its float32 magnitude (which orders like the value),
``-1`` where already pruned; bisection on counts finds the threshold key (on large layers starting
from the bracket that two quantiles of a strided sample give, checked by one counting pass and
narrowed by interpolation), then a second bisection on position splits the ties at it, so the
result is the stable sort's (earlier entry pruned first). Sharded leaves need only reductions. On
one device, or on each shard of a leaf split evenly over a mesh, each counting pass also counts
per block of entries, and the bisection runs over the few blocks inside the bracket
(``_blocks``); the keys and the counting itself are in ``_keys``."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxprune._blocks import (
    _COUNTED,
    Placement,
    _among_candidates,
    _block_counts,
    _block_size,
    _block_sizes,
    _local_size,
    _per_shard,
    _shards,
    _total,
)
from jaxprune._keys import _KEY_MAX, _KEY_TOP, _PRUNED_KEY, _bisect, _column, _count, _keys

_SAMPLE_FROM = 2**16  # ranked slices at least this large start from a sample's quantiles
_SAMPLE_MAX = 2**16


def _before(shape: tuple[int, ...], axis: int | None, cut: jax.Array) -> jax.Array:
    """Whether each entry's row-major index within its layer (its slice) is below ``cut``.

    Compared digit by digit against ``cut``'s multi-index, on iotas only: an array of positions
    would be hoisted out of the loops that use it and kept (4 bytes per weight).
    """
    dims = [d for d in range(len(shape)) if d != axis]
    if not dims:  # one entry per layer
        return jnp.broadcast_to(_column(cut, len(shape), axis) > 0, shape)
    below, equal, rest = jnp.zeros(shape, bool), jnp.ones(shape, bool), cut
    for k, d in enumerate(dims):
        stride = math.prod(shape[e] for e in dims[k + 1 :])
        digit = _column(rest // stride, len(shape), axis)
        index = jax.lax.broadcasted_iota(jnp.int32, shape, d)
        below = below | (equal & (index < digit))
        equal = equal & (index == digit)
        rest = rest % stride
    return below


def _position(shape: tuple[int, ...], axis: int | None) -> jax.Array:
    """Each entry's row-major index within its layer (its slice along ``axis``), from iotas.

    For the final pass only: inside a loop, XLA would hoist it and keep it (4 bytes per weight).
    """
    dims = [d for d in range(len(shape)) if d != axis]
    position = jnp.zeros(shape, jnp.int32)
    for k, d in enumerate(dims):
        stride = math.prod(shape[e] for e in dims[k + 1 :])
        position = position + jax.lax.broadcasted_iota(jnp.int32, shape, d) * stride
    return position


def _sample_keys(
    leaves: tuple[jax.Array, ...],
    prevs: tuple[jax.Array | None, ...],
    axis: int | None,
    size: int,
    placements: tuple[Placement, ...] | None = None,
) -> jax.Array:
    """Keys of a strided sample of about ``size`` entries per ranked slice: ``(slices, m)``.

    With ``placements`` (``axis`` None), a leaf split over a mesh is sampled on each shard, and
    the split leaves' samples come to every device together, in one collective per mesh.
    """
    total = sum(math.prod(x.shape) for x in leaves)
    whole: list[jax.Array] = []
    split: dict = {}  # mesh: the split leaves' samples, a row per shard
    for i, (x, p) in enumerate(zip(leaves, prevs, strict=True)):
        dims = [d for d in range(x.ndim) if d != axis]
        n = math.prod(x.shape[d] for d in dims)
        want = max(1, size * math.prod(x.shape) // total)
        step = max(1, math.floor((n / want) ** (1 / max(len(dims), 1))))
        index = tuple(slice(None) if d == axis else slice(None, None, step) for d in range(x.ndim))

        def strided(x, *p, index=index):  # p: the leaf's previous mask, if any
            return _keys(x[index], p[0][index] if p else None).reshape(-1)

        placement = None if placements is None else placements[i]
        if placement is None:
            key = _keys(x[index], None if p is None else p[index])
            key = key.reshape(1, -1) if axis is None else jnp.moveaxis(key, axis, 0)
            whole.append(key.reshape(key.shape[0], -1))
        else:
            args = (x,) if p is None else (x, p)
            rows = _per_shard(placement, strided, args, "l" * len(args))
            split.setdefault(placement.mesh, []).append(rows)
    for mesh, rows in split.items():  # (shards, m) each, split by rows: joined, then gathered
        everyone = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        joined = jax.lax.with_sharding_constraint(jnp.concatenate(rows, axis=1), everyone)
        whole.append(joined.reshape(1, -1))
    return jnp.concatenate(whole, axis=1)


class _Bracket(NamedTuple):
    """Keys with ``count(lo) < target <= count(hi)``, and those counts, elementwise.

    With blocks (one device), also each leaf's counts per block of entries at both keys: where
    they differ, the block holds entries inside the bracket.
    """

    lo: jax.Array
    hi: jax.Array
    count_lo: jax.Array
    count_hi: jax.Array
    blocks_lo: tuple[jax.Array, ...] = ()
    blocks_hi: tuple[jax.Array, ...] = ()


def _narrowed(b: _Bracket, a, c, count_pair, target: jax.Array) -> _Bracket:
    """The bracket after counting at keys ``lo < a <= c < hi`` (kept where already adjacent)."""
    count_a, count_c, blocks_a, blocks_c = count_pair(a, c)
    above, inside = count_c < target, count_a < target
    done = b.hi <= b.lo + 1

    def ends(lo, hi, at_a, at_c):
        new_lo = jnp.where(above, at_c, jnp.where(inside, at_a, lo))
        new_hi = jnp.where(above, hi, jnp.where(inside, at_c, at_a))
        return jnp.where(done, lo, new_lo), jnp.where(done, hi, new_hi)

    lo, hi = ends(b.lo, b.hi, a, c)
    count_lo, count_hi = ends(b.count_lo, b.count_hi, count_a, count_c)
    blocks = [ends(*x) for x in zip(b.blocks_lo, b.blocks_hi, blocks_a, blocks_c, strict=True)]
    return _Bracket(
        lo, hi, count_lo, count_hi, tuple(x for x, _ in blocks), tuple(y for _, y in blocks)
    )


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


def _sample_keys_at(sample: jax.Array, ranks: jax.Array, slack: jax.Array) -> jax.Array:
    """Keys around the sample's order statistics at ``ranks`` (``(slices, 2)``): lower, upper.

    Bisection on counts over the sample, stopped once at most ``slack`` sample entries lie
    between the ends (the exact order statistics are not needed, only two keys near them): the
    first rank takes the lower end and the second the upper one, so the keys only widen the
    bracket they start. About half the passes of an exact search.
    """

    def count(t):
        return jnp.sum(sample[:, None, :] <= t[..., None], axis=-1, dtype=jnp.int32)

    def body(c):
        lo, hi, count_lo, count_hi = c
        mid = (lo & hi) + ((lo ^ hi) >> 1)
        at_mid = count(mid)
        enough = at_mid >= ranks + 1
        return (
            jnp.where(enough, lo, mid),
            jnp.where(enough, mid, hi),
            jnp.where(enough, count_lo, at_mid),
            jnp.where(enough, at_mid, count_hi),
        )

    def wider(c):
        lo, hi, count_lo, count_hi = c
        return jnp.any((hi > lo + 1) & ((count_hi - count_lo).astype(slack.dtype) > slack))

    m = sample.shape[1]
    start = (
        jnp.full(ranks.shape, _PRUNED_KEY - 1, jnp.int32),
        jnp.full(ranks.shape, _KEY_TOP, jnp.int32),
        jnp.zeros(ranks.shape, jnp.int32),
        jnp.full(ranks.shape, m, jnp.int32),
    )
    lo, hi, _, _ = jax.lax.while_loop(wider, body, start)
    return jnp.stack([jnp.maximum(lo[:, 0], _PRUNED_KEY), hi[:, 1]], -1)


def _start(
    b: _Bracket,
    leaves: tuple[jax.Array, ...],
    prevs: tuple[jax.Array | None, ...],
    axis: int | None,
    n: int,
    target: jax.Array,
    count_pair,
    count_first=None,
    placements: tuple[Placement, ...] | None = None,
) -> _Bracket:
    """``b`` (the whole key range) narrowed where ``n`` is large, keeping its invariant.

    First by one counting pass at two keys of a strided sample, a few standard deviations of its
    rank either side of the target quantile (about 12 fewer bisection passes on smooth data,
    none lost when the sample misleads), then by two interpolation passes (about 4 fewer
    bisection passes again on 2**20 weights). ``count_first`` (default ``count_pair``) counts
    in the first pass, so it can count more there. With ``placements`` (some leaf split over a
    mesh), the sample is copied to every device first: left split, its bisection would
    all-reduce at each of its dozen steps (about 0.1 ms each on CPU devices).
    """
    if n < _SAMPLE_FROM:
        return b
    size = min(_SAMPLE_MAX, 8 * math.isqrt(n))
    mesh = next((s.mesh for s in placements or () if s is not None), None)
    if axis is None:
        sample = _sample_keys(leaves, prevs, axis, size, placements)
    else:  # a leaf ranked per slice: sampled as one array
        sample = _sample_keys(leaves, prevs, axis, size)
        if mesh is not None:
            everyone = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            sample = jax.lax.with_sharding_constraint(sample, everyone)
    m = sample.shape[1]
    p = jnp.clip(target.astype(jnp.float32) / n, 0.0, 1.0)
    margin = 4.0 * jnp.sqrt(m * p * (1.0 - p)) + 2.0
    at = jnp.stack([p * m - margin, p * m + margin], -1)
    at = jnp.clip(at, 0, m - 1).astype(jnp.int32).reshape(-1, 2)
    ac = _sample_keys_at(sample, at, jnp.maximum(margin, 4.0).reshape(-1, 1) / 4)
    ac = ac.reshape(*target.shape, 2)
    # a <= c (ranks in order), both in the whole range: the bracket's ends are never hit.
    b = _narrowed(b, ac[..., 0], ac[..., 1], count_first or count_pair, target)
    for _ in range(2):
        b = _interpolated(b, count_pair, target)
    return b


def _narrowed_to(b: _Bracket, count_pair, target: jax.Array, most: int) -> _Bracket:
    """Up to three more interpolation passes while the bracket holds over ``most`` entries.

    Where the target falls near a power of two of the magnitudes, the keys' density jumps there
    and an interpolation across it misses; the next one, within one octave, does not.
    """

    def more(c):
        b, passes = c
        return (passes < 3) & jnp.any(b.count_hi - b.count_lo > most)

    def step(c):
        return _interpolated(c[0], count_pair, target), c[1] + 1

    return jax.lax.while_loop(more, step, (b, 0))[0]


def _ranked_keep(
    leaves: tuple[jax.Array, ...],
    prevs: tuple[jax.Array | None, ...],
    axes: tuple[int | None, ...],
    n_pruned: jax.Array,
    placements: tuple[Placement, ...] | None = None,
    nonfinite: bool = False,
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Keeps all but the ``n_pruned`` lowest-ranked entries of the leaves taken together.

    Returns the masks, and with ``nonfinite`` each leaf's count of NaN and inf weights (masked
    ones too; else ``()``): where the first narrowing pass counts per block, that count rides in
    it, so checking the weights costs no pass of its own.

    The rank is ``(key, leaf, position)``: magnitude first, then flattening order. With one leaf
    and an ``axis``, every slice along it is ranked on its own (``n_pruned`` per slice). Found by
    bisection on counts (the threshold key, then the position cut among the entries equal to
    it), so nothing is sorted and sharded leaves need only reductions. With ``placements`` (each
    leaf whole, or split evenly over a mesh), the threshold is searched among the few blocks of
    entries inside the start's bracket, gathered on each shard, instead of over every weight
    (the passes that narrow the bracket count per block of each shard too).
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

    axis = axes[0] if len(leaves) == 1 else None
    n = sum(math.prod(x.shape) for x in leaves) // (1 if axis is None else leaves[0].shape[axis])
    gather = placements is not None and axis is None and n >= _SAMPLE_FROM
    size = _block_size(n) if gather else 0  # entries per candidate block
    counted = min(size, _COUNTED)  # with gather, passes count per block of this many

    # Per-block counts travel concatenated, one array per distinct placement: carried through the
    # loops as one array a leaf, they made XLA's compile time grow faster than the leaf count.
    order = list(dict.fromkeys(placements or ()))

    def grouped(per_leaf) -> tuple[jax.Array, ...]:
        assert placements is not None
        return tuple(
            jnp.concatenate([a for a, s in zip(per_leaf, placements, strict=True) if s == g], -1)
            for g in order
        )

    def ungrouped(groups: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        assert placements is not None
        out, start = [], dict.fromkeys(order, 0)
        for x, s in zip(leaves, placements, strict=True):
            blocks = -(-_local_size(x, s) // counted)
            out.append(groups[order.index(s)][..., start[s] : start[s] + blocks])
            start[s] += blocks
        return tuple(out)

    bad: list[tuple[jax.Array, ...]] = []  # non-finite counts per leaf, from the first pass

    def count_pair(a, c, raw=False):
        xs, ps, a, c = jax.lax.optimization_barrier((leaves, prevs, a, c))
        keys = [_keys(x, p) for x, p in zip(xs, ps, strict=True)]
        if gather:
            assert placements is not None
            per_leaf = [
                _per_shard(
                    placement,
                    lambda k, x, a, c: _block_counts(k, a, c, counted, ~jnp.isfinite(x)),
                    (key, x, a, c),
                    "llrr",
                )
                if raw
                else _per_shard(
                    placement, lambda k, a, c: _block_counts(k, a, c, counted), (key, a, c), "lrr"
                )
                for key, x, placement in zip(keys, xs, placements, strict=True)
            ]
            at_a, at_c = tuple(c[0] for c in per_leaf), tuple(c[1] for c in per_leaf)
            if raw:  # summed over a split leaf's shards
                bad.append(tuple(jnp.sum(c[2], dtype=jnp.int32) for c in per_leaf))
            return _total(at_a), _total(at_c), grouped(at_a), grouped(at_c)
        counts = [
            (
                _count(key <= _column(a, key.ndim, ax), ax),
                _count(key <= _column(c, key.ndim, ax), ax),
            )
            for key, ax in zip(keys, axes, strict=True)
        ]
        return sum(ca for ca, _ in counts), sum(cc for _, cc in counts), (), ()

    b = _Bracket(
        jnp.full(n_pruned.shape, _PRUNED_KEY - 1, jnp.int32),
        jnp.full(n_pruned.shape, _KEY_TOP, jnp.int32),
        jnp.zeros(n_pruned.shape, jnp.int32),
        jnp.full(n_pruned.shape, n, jnp.int32),
    )
    if gather:  # at the top end every block may hold entries of the bracket
        assert placements is not None
        sizes = [
            _block_sizes(_local_size(x, s), counted)
            if s is None
            else jnp.tile(_block_sizes(_local_size(x, s), counted), (_shards(s), 1))
            for x, s in zip(leaves, placements, strict=True)
        ]
        b = b._replace(
            blocks_lo=grouped([jnp.zeros_like(s) for s in sizes]), blocks_hi=grouped(sizes)
        )
    counts_bad = nonfinite and gather
    first = functools.partial(count_pair, raw=True) if counts_bad else None
    b = _start(b, leaves, prevs, axis, n, n_pruned, count_pair, first, placements)
    if not nonfinite:
        found: tuple[jax.Array, ...] = ()
    elif counts_bad:
        (found,) = bad
    else:
        found = tuple(_count(~jnp.isfinite(x), None) for x in leaves)

    def everywhere(lo, hi):
        threshold = _bisect(lambda t: count_at(t, jnp.less_equal), lo, hi, n_pruned)
        # One pass for both: the entries below the threshold and the ties at it, per leaf.
        xs, ps, t = jax.lax.optimization_barrier((leaves, prevs, threshold))
        key_ts = [
            (_keys(x, p), _column(t, x.ndim, a)) for x, p, a in zip(xs, ps, axes, strict=True)
        ]
        ties = tuple(_count(k == kt, a) for (k, kt), a in zip(key_ts, axes, strict=True))
        below = sum(_count(k < kt, a) for (k, kt), a in zip(key_ts, axes, strict=True))
        return threshold, below, ties

    if gather:
        b = _narrowed_to(b, count_pair, n_pruned, math.isqrt(n))
        b = b._replace(blocks_lo=ungrouped(b.blocks_lo), blocks_hi=ungrouped(b.blocks_hi))
        threshold, below, tie_counts = _among_candidates(
            leaves, prevs, placements, b, n_pruned, everywhere, size
        )
    else:
        threshold, below, tie_counts = everywhere(b.lo, b.hi)
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
        # Keys recomputed behind a barrier tied to the cut: else XLA keeps them from the start.
        x, p, t, cut = jax.lax.optimization_barrier((x, p, threshold, cut))
        key, t = _keys(x, p), _column(t, key.ndim, axis)
        # Pruned: the keys below t, and before the cut the ties too: one compare per weight
        # against t or t + 1 (t <= _KEY_TOP, so no overflow); about 0.6x the time of
        # comparing and combining the two conditions on CPU.
        before = _position(key.shape, axis) < _column(cut, key.ndim, axis)
        out.append(key >= jnp.where(before, t + 1, t))
    return tuple(out), found


def _tie_cut(x, prev, threshold, axis, partial, hi, take) -> jax.Array:
    """The smallest position ``c`` with ``take`` ties before it, where ``partial``; else ``hi``."""

    def count_before(c):
        xs, ps, t, c = jax.lax.optimization_barrier((x, prev, threshold, c))
        key = _keys(xs, ps)
        tied = key == _column(t, key.ndim, axis)
        return _count(tied & _before(key.shape, axis, c), axis)

    return _bisect(count_before, jnp.where(partial, -1, hi - 1), hi, take)


_STATIC = ("axes", "placements", "nonfinite")
_jitted = jax.jit(_ranked_keep, static_argnames=_STATIC)
# XLA's CPU scheduler orders for concurrency by default: with leaves split over a mesh, it ran
# every leaf's candidate gathering at once (2.1 bytes per local weight for 24 split leaves in
# global scope, against 1.04 ordered for memory). Other backends ignore the option.
_LEAN = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
_jitted_lean = jax.jit(_ranked_keep, static_argnames=_STATIC, compiler_options=_LEAN)


@functools.cache
def _lean_available() -> bool:
    """Whether this jaxlib takes the option (a jaxlib that renamed it would refuse every call)."""
    try:
        jax.jit(lambda x: x, compiler_options=_LEAN).lower(jnp.zeros(())).compile()
    except jax.errors.JaxRuntimeError:
        return False
    return True


def compiled(placements: tuple[Placement, ...] | None):
    """The jitted :func:`_ranked_keep` for leaves so placed: ordered for memory if one is split."""
    split = placements is not None and any(s is not None for s in placements)
    return _jitted_lean if split and _lean_available() else _jitted


def check_countable(what: str, n: int) -> None:
    if n > _KEY_MAX:
        raise ValueError(
            f"{what} rank {n:,} weights together; masks_for_sparsity counts in int32, so at "
            f"most {_KEY_MAX:,}. Use scope='layer', or stacked= to rank a leaf per slice."
        )
