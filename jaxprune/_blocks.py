"""Blocks of entries for ``masks_for_sparsity``: counts per block, and gathering the few in range.

Each counting pass that narrows the ranking's bracket also counts per block of 128 entries, so
the blocks holding entries inside it are known without a pass of their own; those blocks (at
most an eighth) are gathered and the threshold searched among them only. A leaf split evenly
over a mesh is handled so on each shard (``shard_map``), and each shard's candidates (the
pieces of its flagged blocks that hold entries of the bracket, or in global scope just those
entries) then come to every device, so the search needs no collective per step."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._keys import _KEY_MAX, _bisect, _count, _keys, _sum_small

if TYPE_CHECKING:
    from jaxprune._ranking import _Bracket


class Split(NamedTuple):
    """A leaf laid out over ``mesh`` by ``spec`` (a ``NamedSharding``), every dimension evenly."""

    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh
    spec: jax.sharding.PartitionSpec

    @staticmethod
    def _names(entry) -> tuple[str, ...]:
        return () if entry is None else entry if isinstance(entry, tuple) else (entry,)

    @property
    def axes(self) -> tuple[str, ...]:
        """The mesh axes the leaf is split over, in order."""
        return tuple(a for e in self.spec for a in self._names(e))

    @property
    def shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.axes)

    def divides(self, shape: tuple[int, ...]) -> bool:
        """Whether every dimension of ``shape`` splits evenly (``shard_map`` needs that)."""
        ways = [math.prod(self.mesh.shape[a] for a in self._names(e)) for e in self.spec]
        return all(d % w == 0 for d, w in zip(shape, ways, strict=False))


Placement = Split | None  # None: the leaf is whole on every device that holds it


def placements_of(leaves) -> tuple[Placement, ...] | None:
    """How each leaf lies, where entries may be gathered per shard; ``None`` where they may not.

    A leaf is whole on one device (or replicated), or split evenly over a mesh by a
    ``NamedSharding``. Traced leaves on several devices may be sharded in ways not known while
    tracing, and other shardings are not split by mesh axes: those are ranked by reductions only.
    """
    if jax.device_count() == 1:
        return tuple(None for _ in leaves)
    out: list[Placement] = []
    for x in leaves:
        if isinstance(x, jax.core.Tracer):
            return None
        sharding = x.sharding
        if len(sharding.device_set) == 1 or sharding.is_fully_replicated:
            out.append(None)
            continue
        if not isinstance(sharding, jax.sharding.NamedSharding):
            return None
        split = Split(sharding.mesh, sharding.spec)
        if not split.divides(x.shape):
            return None
        out.append(split)
    return tuple(out)


def _shards(placement: Placement) -> int:
    return 1 if placement is None else placement.shards


def _local_size(x: jax.Array, placement: Placement) -> int:
    return math.prod(x.shape) // _shards(placement)


def _per_shard(placement: Placement, fn, args: tuple, kinds: str):
    """``fn`` on each shard of a split leaf, its outputs stacked on a new first axis (of shards).

    ``kinds`` gives each argument's placement: ``l`` like the leaf, ``s`` one row per shard (an
    output of this function), ``r`` replicated. With the leaf whole, ``fn`` runs once on it and
    its outputs come as they are (no axis of shards).
    """

    def stacked(*a):
        return jax.tree.map(lambda y: y[None], fn(*a))

    if placement is None:
        return fn(*args)
    rows = jax.sharding.PartitionSpec(placement.axes)
    specs = {"l": placement.spec, "s": rows, "r": jax.sharding.PartitionSpec()}

    def local(*a):
        return stacked(*(x[0] if k == "s" else x for x, k in zip(a, kinds, strict=True)))

    return jax.shard_map(
        local, mesh=placement.mesh, in_specs=tuple(specs[k] for k in kinds), out_specs=rows
    )(*args)


_OVERFLOW = -3  # below every key (an entry's is at least -1): a shard's flagged blocks overflow

_COUNTED = 128  # entries per block that a pass counts in (a candidate block holds whole ones)
_PIECE = 16  # entries per piece of a candidate block that the threshold's search counts in


def _block_counts(
    key: jax.Array, a: jax.Array, c: jax.Array, size: int, flags: jax.Array | None = None
) -> tuple:
    """Keys ``<= a`` and ``<= c`` per block of ``size`` (at most 255) consecutive entries (uint8).

    Row-major; the last block may be short. Both counts ride in one uint16 (``a``'s in the low
    byte), so one reduction counts both; groups of 16 entries a block apart are summed first (a
    reduction over a major axis, which XLA on CPU vectorises). With ``flags`` (bools of the
    key's shape, e.g. which weights are NaN or inf), a third value: how many are set, counted in
    a third byte of the same reduction (uint32 then; the pass takes as long, being bound by its
    reads), so the NaN check needs no pass of its own.
    """
    flat = key.reshape(-1)
    rest = None if flags is None else flags.reshape(-1)
    n = flat.shape[0]
    full = n // size * size
    dtype = jnp.uint16 if flags is None else jnp.uint32

    def packed(k, f):
        both = (k <= a).astype(dtype) | ((k <= c).astype(dtype) << 8)
        return both if f is None else both | (f.astype(dtype) << 16)

    parts = []
    if full:
        head = packed(flat[:full], None if rest is None else rest[:full])
        head = head.reshape(-1, 16, size // 16)
        parts.append(jnp.sum(jnp.sum(head, axis=1, dtype=dtype), axis=-1, dtype=dtype))
    if full < n:
        tail = packed(flat[full:], None if rest is None else rest[full:])
        parts.append(jnp.sum(tail, dtype=dtype)[None])
    counts = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
    at_a, at_c = (counts & 0xFF).astype(jnp.uint8), ((counts >> 8) & 0xFF).astype(jnp.uint8)
    if flags is None:
        return at_a, at_c
    return at_a, at_c, jnp.sum(counts >> 16, dtype=jnp.int32)


def _block_sizes(n: int, size: int) -> jax.Array:
    """The entries of each block that :func:`_block_counts` counts in."""
    sizes = np.full(-(-n // size), size, np.uint8)
    sizes[-1] = n - size * (len(sizes) - 1)
    return jnp.asarray(sizes)


def _flagged(counts_lo: jax.Array, counts_hi: jax.Array, per: int) -> jax.Array:
    """Whether each group of ``per`` counted blocks (the last may be short) has entries between.

    Along the last axis (one row per shard)."""
    differ = counts_hi > counts_lo
    pad = [(0, 0)] * (differ.ndim - 1) + [(0, -differ.shape[-1] % per)]
    return jnp.any(jnp.pad(differ, pad).reshape(*differ.shape[:-1], -1, per), axis=-1)


def _total(counts: tuple[jax.Array, ...]) -> jax.Array:
    return functools.reduce(jnp.add, [_sum_small(c, tuple(range(c.ndim))) for c in counts])


def _block_size(n: int) -> int:
    """Entries per candidate block: a power of two near ``sqrt(n) / 8`` (at least 16).

    About ``8 * sqrt(n)`` blocks. On smooth data the start's bracket holds about ``sqrt(n) / 10``
    to ``sqrt(n) / 2`` entries, each in a block of its own, so the flagged blocks fit in a 32nd
    to an eighth of them, and finding them stays cheap.
    """
    return max(16, 1 << round(math.log2(math.sqrt(n) / 8)))


def _first_true(flags: jax.Array, cap: int) -> jax.Array:
    """Indices of the first ``cap`` true entries of a 1-D ``flags``, padded with ``len(flags)``.

    ``jnp.nonzero(size=cap)``'s answer at about half its cost on CPU: ranks within rows of 128
    by a product with a triangular matrix (exact: sums of at most 128 ones), then one scatter.
    """
    n, row = flags.shape[0], 128
    padded = jnp.pad(flags, (0, -n % row)).reshape(-1, row).astype(jnp.float32)
    upper = jnp.triu(jnp.ones((row, row), jnp.float32))
    within = jnp.dot(padded, upper, precision=jax.lax.Precision.HIGHEST).astype(jnp.int32)
    before = jnp.cumsum(within[:, -1]) - within[:, -1]
    rank = (within + before[:, None]).reshape(-1)[:n] - 1
    where = jnp.where(flags, rank, cap)  # rank >= cap, or no flag: dropped
    return jnp.full(cap, n, jnp.int32).at[where].set(jnp.arange(n, dtype=jnp.int32), mode="drop")


def _candidate_keys(
    x: jax.Array,
    prev: jax.Array | None,
    flags: jax.Array,
    lo: jax.Array,
    hi: jax.Array,
    size: int,
    cap: int,
    pieces: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The keys in ``(lo, hi]`` of one leaf's first ``cap`` flagged blocks, else ``_KEY_MAX``.

    Returns them, ``(cap, size)``, and whether they fit (at most ``cap`` flagged blocks). With
    ``pieces``, only those blocks' pieces of :data:`_PIECE` entries that hold any such key, the
    first ``cap`` of them, ``(cap, _PIECE)``, and whether those fit too. A bracket of at most
    ``cap`` entries fits either way. A leaf (or shard) under eight blocks is taken whole,
    ``(1, n)``.
    """
    flat = x.reshape(-1)
    p = None if prev is None else prev.reshape(-1)
    n = flat.shape[0]
    if n < 8 * size:
        key = _keys(flat, p)
        return jnp.where((key > lo) & (key <= hi), key, _KEY_MAX)[None], jnp.asarray(True)
    keys = _block_keys(x, prev, _first_true(flags, cap), flags.shape[0], lo, hi, size)
    fits = jnp.sum(flags, dtype=jnp.int32) <= cap
    if not pieces or size <= _PIECE:
        return keys, fits
    # Each flagged block holds few entries of the bracket (one, on smooth data): searched as
    # they are, the blocks made the search count 8 times the keys.
    parts = keys.reshape(-1, _PIECE)
    held = jnp.any(parts != _KEY_MAX, axis=1)
    index = _first_true(held, cap)
    ok = index < parts.shape[0]
    picked = jnp.where(ok[:, None], parts[jnp.minimum(index, parts.shape[0] - 1)], _KEY_MAX)
    return picked, fits & (jnp.sum(held, dtype=jnp.int32) <= cap)


def _block_keys(x, prev, index, blocks: int, lo, hi, size: int) -> jax.Array:
    """The keys in ``(lo, hi]`` of the blocks at ``index`` (``blocks`` past the end: none)."""
    flat = x.reshape(-1)
    p = None if prev is None else prev.reshape(-1)
    n = flat.shape[0]

    def inside(key):
        return (key > lo) & (key <= hi)

    # The last block may be short: its slice starts earlier and skips what the one before holds.
    start = jnp.minimum(index * size, n - size)

    def block(a):
        return jax.vmap(lambda s: jax.lax.dynamic_slice(a, (s,), (size,)))(start)

    key = _keys(block(flat), None if p is None else block(p))
    own = start[:, None] + jnp.arange(size)[None, :] >= (index * size)[:, None]
    return jnp.where(own & (index < blocks)[:, None] & inside(key), key, _KEY_MAX)


def _compacted(keys: jax.Array, most: int) -> jax.Array:
    """The first ``most`` keys other than ``_KEY_MAX`` (flattened), padded with ``_KEY_MAX``."""
    flat = keys.reshape(-1)
    index = _first_true(flat != _KEY_MAX, most)
    return jnp.where(index < flat.shape[0], flat[jnp.minimum(index, flat.shape[0] - 1)], _KEY_MAX)


def _everywhere(keys: list, placements) -> tuple[list, list]:
    """Split leaves' candidate keys (a row per shard) on every device: one collective a mesh.

    Returns the arrays held (per mesh, the split leaves' rows side by side, replicated) and, per
    leaf, where its keys are: its own array, ``(held index, start, stop, shape)`` (the columns
    of its mesh's), or ``None`` (gathered at each step). Sliced where used, they are not copied;
    reshaped as they were, they are counted as fast (a 2-D view of a layer's candidate blocks
    took about 1.1x the time).
    """
    held: list = []
    where: list = list(keys)
    by_mesh: dict = {}
    for i, (k, s) in enumerate(zip(keys, placements, strict=True)):
        if k is not None and s is not None:
            by_mesh.setdefault(s.mesh, []).append(i)
    for mesh, members in by_mesh.items():
        rows = [keys[i].reshape(keys[i].shape[0], -1) for i in members]
        joined = rows[0] if len(rows) == 1 else jnp.concatenate(rows, axis=1)
        everyone = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        held.append(jax.lax.with_sharding_constraint(joined, everyone))
        start = 0
        for i, r in zip(members, rows, strict=True):
            where[i] = (len(held) - 1, start, start + r.shape[1], keys[i].shape)
            start += r.shape[1]
    return held, where


def _view(held: list, where):
    """A leaf's keys from :func:`_everywhere`'s answer (``where`` an array: as it is)."""
    if not isinstance(where, tuple):
        return where
    j, start, stop, shape = where
    return held[j][:, start:stop].reshape(shape)


def _among_candidates(leaves, prevs, placements, b: _Bracket, n_pruned, everywhere, size: int):
    """``everywhere``'s answer (threshold key, count below it, ties per leaf) from few entries.

    Only the blocks holding entries in ``b``'s bracket (where its per-block counts differ) are
    searched, an eighth of each shard's blocks at most, gathered on each shard: every entry in
    ``(lo, hi]`` (the ties at the threshold among them) lies in one and ``count(lo)`` is known,
    so the counts are exact. When the flagged blocks do not fit, ``everywhere`` (bisection over
    all weights) answers instead. Which blocks to gather is found outside that ``cond``: with
    the whole gathering inside a branch, XLA's compile time grew faster than the number of
    leaves (minutes for 96 in global scope).

    Ranked with others (global scope), a whole leaf's candidate blocks are gathered again at
    each step of the search rather than held, each leaf's for all of them at once (that
    gathering is inside the branch: 96 leaves of 2**20 compiled in 31 s against 29 s before).

    A split leaf's shards send their candidates to every device, so the bisection needs no
    collective per step; all split leaves' go together, in one collective per mesh. Each shard
    sends only the pieces of 16 entries of its flagged blocks that hold keys of the bracket (on
    smooth data about one a block), at most as many pieces as it may flag blocks of 128 or
    more: the search counts an eighth of the keys or fewer, and a split layer's ranking took
    0.85-0.89x the time (32 layers of 2**20 on 2 CPU devices; 0.67-0.77x in global scope, where
    the compaction below starts from those pieces too). Ranked with others (global
    scope, where every leaf's are held at once), each shard also compacts its keys in the
    bracket to 4x its share of ``sqrt(n)``. A whole leaf ranked alone holds its flagged blocks
    as they are: finding their pieces took XLA more temporaries (5% more memory for 24 layers
    of 2048x2048 under jit) than it saved.
    """
    per = size // min(size, _COUNTED)
    flags = [_flagged(lo, hi, per) for lo, hi in zip(b.blocks_lo, b.blocks_hi, strict=True)]
    caps = [max(1, f.shape[-1] // 8) for f in flags]
    # The entries in the bracket a split leaf's shard may bring, in global scope: 4x its share
    # of ``sqrt(n)`` (the most the narrowing leaves on smooth data), at least 256.
    n = sum(math.prod(x.shape) for x in leaves)
    most = [
        max(256, 4 * math.isqrt(n) * _local_size(x, s) // n)
        for x, s in zip(leaves, placements, strict=True)
    ]
    compact = len(leaves) > 1

    def candidates(x, p, f, placement, cap, most):
        """The leaf's candidate keys; for a split leaf, each shard's (one row each, still split).

        A shard whose candidates overflow (more flagged blocks than ``cap``, or compacted, more
        keys than ``most``) says so in its first key, so that telling every device needs no
        collective of its own (the keys go to all of them anyway).
        """

        def local(x, p, f, lo, hi):
            keys, fits = _candidate_keys(x, p, f, lo, hi, size, cap, placement is not None)
            if placement is None or _local_size(x, None) < 8 * size:  # x: this shard
                return keys
            if compact:
                fits = fits & (_count(keys != _KEY_MAX, None) <= most)
                keys = _compacted(keys, most)
            first = (0,) * keys.ndim
            return keys.at[first].set(jnp.where(fits, keys[first], _OVERFLOW))

        if p is None:
            return _per_shard(
                placement,
                lambda x, f, lo, hi: local(x, None, f, lo, hi),
                (x, f, b.lo, b.hi),
                "lsrr",
            )
        return _per_shard(placement, local, (x, p, f, b.lo, b.hi), "llsrr")

    # Ranked with others, a whole leaf's candidate blocks are gathered again at each step
    # (behind a barrier tied to the step's key, so XLA cannot hoist the gather and hold them):
    # held, every leaf's would take half a byte per weight at once. Only where they lie is kept
    # (``index``). A leaf ranked alone holds them: gathered at each step, a layer's ranking
    # took 1.2-1.35x the time.
    lazy = [
        compact and s is None and _local_size(x, s) >= 8 * size
        for x, s in zip(leaves, placements, strict=True)
    ]
    index = [_first_true(f, c) if ok else None for f, c, ok in zip(flags, caps, lazy, strict=True)]
    keys = [
        None if ok else candidates(x, p, f, placement, cap, m)
        for x, p, f, placement, cap, m, ok in zip(
            leaves, prevs, flags, placements, caps, most, lazy, strict=True
        )
    ]
    held, where = _everywhere(keys, placements)

    def keys_at(t):
        if not any(lazy):
            return [_view(held, w) for w in where], t
        xs, ps, ix, t = jax.lax.optimization_barrier((leaves, prevs, index, t))
        out = [
            _view(held, w) if i is None else _block_keys(x, p, i, f.shape[-1], b.lo, b.hi, size)
            for x, p, i, f, w in zip(xs, ps, ix, flags, where, strict=True)
        ]
        return out, t

    def among(lo, hi):
        def count(t):
            ks, t = keys_at(t)
            return b.count_lo + sum(_count(k <= t, None) for k in ks)

        t = _bisect(count, lo, hi, n_pruned)
        ks, t = keys_at(t)
        below = b.count_lo + sum(_count(k < t, None) for k in ks)
        return t, below, tuple(_count(k == t, None) for k in ks)

    fits = [
        jnp.all(held[w[0]][:, w[1]] != _OVERFLOW)
        if isinstance(w, tuple)
        else jnp.max(jnp.sum(f, axis=-1, dtype=jnp.int32)) <= c
        for f, c, x, s, w in zip(flags, caps, leaves, placements, where, strict=True)
        if _local_size(x, s) >= 8 * size  # else taken whole: always fits
    ] or [jnp.asarray(True)]
    return jax.lax.cond(functools.reduce(jnp.logical_and, fits), among, everywhere, b.lo, b.hi)
