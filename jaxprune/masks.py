"""Pruning masks: Han et al.'s ``q * std`` rule, target sparsity, and applying masks.

A mask tree has exactly the structure of the params tree it was made from. Every array leaf gets a
boolean array of its own shape (``True`` = connection kept); leaves that are not prunable get an
all-``True`` mask, non-array leaves the Python value ``True``. So ``jax.tree.map(f, params, masks)``
always works, for Flax Linen dicts and NNX states alike.

Which leaves are prunable is decided by ``where(path, leaf)``; the default
(:func:`jaxprune.default_where`) takes Flax's weights by name (``kernel``, ``embedding``) and never
biases, norm scales, batch statistics, integer leaves or non-array leaves, whatever their ndim.
Layers stacked in one array (``nn.scan``, ``nnx.scan``) are separate layers with ``stacked=``.
Counting what masks keep is :mod:`jaxprune.summary`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._blocks import Placement, placements_of
from jaxprune._options import QSpec, check_scalar, is_traced, per_slice, per_unit
from jaxprune._ranking import check_countable, compiled
from jaxprune._settle import settled
from jaxprune._tree import (
    PyTree,
    Stacked,
    Where,
    check_finite,
    check_masks,
    is_array,
    layer_units,
    leaves_with_paths,
    path_str,
    prunable_paths,
    raise_nonfinite,
    stacked_axes,
)


def _leafwise(fn, params: PyTree, previous: PyTree | None) -> PyTree:
    """Maps ``fn(path, leaf, prev)`` over params, with ``prev`` None when there is no previous."""
    if previous is None:
        return jax.tree_util.tree_map_with_path(lambda kp, x: fn(path_str(kp), x, None), params)
    return jax.tree_util.tree_map_with_path(
        lambda kp, x, m: fn(path_str(kp), x, m), params, previous
    )


def _keep_all(leaf: Any, prev: Any) -> Any:
    if not is_array(leaf):
        return True
    full = jnp.ones_like(leaf, dtype=bool)  # placed (sharded) like the leaf
    return full if prev is None else full & jnp.asarray(prev, dtype=bool)


def _prepare(
    params, previous, where, stacked, *, finite: bool = True
) -> tuple[dict[str, bool], dict[str, int]]:
    """The prunable leaves and stacked axes, after the checks (the NaN check unless not
    ``finite``, for a caller that checks the values itself)."""
    prunable = prunable_paths(params, where)
    axes = stacked_axes(params, stacked, prunable)
    if previous is not None:
        check_masks(params, previous, name="previous")
    if finite:
        check_finite({p: leaf for p, leaf in leaves_with_paths(params) if prunable[p]})
    return prunable, axes


def compute_masks(
    params: PyTree,
    q: QSpec,
    *,
    previous: PyTree | None = None,
    where: Where | None = None,
    stacked: Stacked | None = None,
) -> PyTree:
    """Computes pruning masks with Han et al.'s rule: keep ``|w| >= q * std(layer)``.

    Han et al. 2015 (Sec. 3) prune, in each layer, the connections whose magnitude is below a quality
    parameter ``q`` times the standard deviation of the layer's weights.

    The std is taken over **all** entries of the layer, with connections already pruned by
    ``previous`` counted as zeros, i.e. the std of the layer's weight matrix as it stands. Taking it
    over the survivors only would raise the threshold every round (the small weights are gone, so the
    spread of what remains grows) and the same ``q`` would cut deeper and deeper: iterative pruning
    would over-prune. With the std over the whole matrix, a fixed ``q`` settles, and a rising ``q``
    schedule controls how much each round removes.

    Args:
      params: a pytree of parameters (a Linen ``variables['params']`` dict, an NNX
        ``nnx.state(model, nnx.Param)``, or any pytree).
      q: the quality parameter, ``>= 0``. A scalar (it may be traced: under ``jax.jit`` a new
        ``q`` does not recompile), or a mapping from a leaf path (``'Dense_0/kernel'``), a layer
        path (``'Dense_0'``) or an ``fnmatch`` pattern (``'Conv_*'``) to a scalar. Exact names win
        over patterns. Prunable leaves that a mapping does not name are not pruned by this call.
      previous: masks from an earlier round; a pruned connection stays pruned (the new mask is
        and-ed with it).
      where: ``where(path, leaf) -> bool`` choosing the prunable leaves; default
        :func:`jaxprune.default_where` (leaves named ``kernel`` or ``embedding``).
      stacked: ``{pattern: axis}`` for layers stacked in one array (``nn.scan`` /
        ``nnx.scan`` / ``nnx.vmap`` with ``variable_axes={'params': 0}`` make kernels of shape
        ``(layers, in, out)``): every slice along ``axis`` of a matching leaf is its own layer,
        with its own std and its own q (a mapping may name ``'path[i]'``). A pattern names a leaf
        path, a prefix ending at ``/`` (the scanned module, e.g. ``'layers'``) or a glob.

    Returns:
      A mask tree with the structure of ``params``: a boolean array of the leaf's shape for each
      array leaf (all ``True`` where the leaf is not pruned), ``True`` for non-array leaves.

    Raises:
      ValueError: on a negative or non-finite ``q``, a ``q`` key matching no prunable leaf,
        ``previous`` not matching ``params``, NaN or inf in a prunable weight, no prunable leaf,
        or a ``stacked`` pattern that matches nothing, has an axis out of range or stacks leaves
        of different lengths, or ``previous`` sharded otherwise than ``params``.
        Checks of values (``q``, NaN) run on concrete inputs, before tracing; under ``jax.jit``
        traced values cannot be inspected and are taken as given.
      TypeError: if ``where`` selects a leaf that is not a floating-point array, a ``previous``
        mask is not boolean, or ``q`` is not a real number.

    >>> import numpy as np
    >>> params = {'Dense_0': {'kernel': np.array([[0.1, -2.0], [3.0, 0.0]]), 'bias': np.ones(2)}}
    >>> masks = compute_masks(params, 0.5)
    >>> masks['Dense_0']['kernel'].tolist(), masks['Dense_0']['bias'].tolist()
    ([[False, True], [True, False]], [True, True])
    """
    prunable, axes = _prepare(params, previous, where, stacked)
    q_of = per_unit(
        q, layer_units(params, prunable, axes), name="q", high=math.inf, closed_high=False
    )
    by_leaf: dict[str, dict[int | None, Any]] = {}
    for unit, value in q_of.items():
        by_leaf.setdefault(unit.path, {})[unit.index] = value

    def one(path: str, leaf: Any, prev: Any) -> Any:
        if path not in by_leaf:
            return _keep_all(leaf, prev)
        prev = None if prev is None else jnp.asarray(prev, dtype=bool)
        axis = axes.get(path)
        if axis is None:
            q_leaf = jnp.asarray(by_leaf[path][None], dtype=jnp.float32)
        else:  # one std and one q per slice; a slice without a q keeps everything
            q_leaf = per_slice(by_leaf[path], leaf.shape[axis], axis, leaf.ndim, fill=0.0)
        return settled(_keep_above_std(leaf, q_leaf, prev, axis=axis), leaf)

    return _leafwise(one, params, previous)


@functools.partial(jax.jit, static_argnames="axis")
def _keep_above_std(
    leaf: jax.Array, q: jax.Array, prev: jax.Array | None, axis: int | None
) -> jax.Array:
    """``|w| >= q * std(w)`` over the leaf, or per slice along ``axis``; pruned entries count as 0.

    One compiled function per leaf shape: eagerly, each of its ops would compile on its own.
    """
    w = jnp.asarray(leaf).astype(jnp.float32)
    if prev is not None:
        w = jnp.where(prev, w, 0.0)
    others = None if axis is None else tuple(a for a in range(w.ndim) if a != axis)
    keep = jnp.abs(w) >= q * jnp.std(w, axis=others, keepdims=axis is not None)
    return keep if prev is None else keep & prev


def _pruned_count(sparsity: Any, n: int) -> Any:
    # Round half up; exact in Python for a concrete sparsity, float32 when traced.
    if is_traced(sparsity):
        return jnp.floor(sparsity * n + 0.5).astype(jnp.int32)
    return math.floor(float(sparsity) * n + 0.5)


def _as_int32(counts: list[Any]) -> Any:
    """The counts as one int32 array: NumPy where all are concrete, so that a call on leaves over
    several devices places it by itself (a JAX array on the default device is moved there by a
    slow path, about 0.3 ms a call)."""
    if any(is_traced(c) for c in counts):
        return jnp.stack([jnp.asarray(c, jnp.int32) for c in counts])
    return np.asarray(counts, np.int32)


def masks_for_sparsity(
    params: PyTree,
    sparsity: Any,
    *,
    scope: str = "layer",
    previous: PyTree | None = None,
    where: Where | None = None,
    stacked: Stacked | None = None,
) -> PyTree:
    """Masks that prune exactly a ``sparsity`` fraction of the smallest-magnitude weights.

    The number pruned is ``floor(sparsity * n + 0.5)`` of the ``n`` weights in scope. Weights are
    ranked by the float32 magnitude ``|w|``; ties are broken by position: the earlier entry (in
    flattening order of the leaves, then row-major within a leaf, or within a slice of a stacked
    leaf) is pruned first. Connections already pruned by ``previous`` rank below every weight, so
    they are pruned first and stay pruned; if they already exceed the target, the result is
    ``previous`` itself.

    Nothing is sorted: the threshold is found by bisection on counts. On layers of ``2**16``
    weights or more, a strided sample's quantiles and a few interpolation passes first narrow
    the range to about ``sqrt(n) / 2`` weights; each of those passes also counts per block of
    128 entries, so the blocks that hold the range's entries are known, and they are gathered
    (at most an eighth of the blocks) for the bisection: about four passes over the weights in
    all, the first of which also counts NaN and inf (the check that :func:`compute_masks` makes
    in a pass of its own; the error is raised once the masks are computed). A leaf split
    evenly over a mesh by a ``NamedSharding`` is treated so on each shard, and each shard's
    candidates come to every device (one all-gather for all split leaves: in layer scope its
    flagged blocks, at most an eighth of the leaf, in global scope only the entries in the
    range). Leaves sharded otherwise, or traced with several devices present, need only
    reductions (about 16-20 passes). The masks keep the params' sharding, and global scope sums
    counts across leaves and devices instead of gathering the weights. A few dozen passes more
    run over the entries tied at the threshold when a tie must be split. XLA's temporaries come
    to 0.02-0.05 of a byte per weight at 100M parameters (about 150 KB a ranking, which shows
    on small trees), beside the masks themselves; on a split leaf in layer scope, each device
    holds up to half a byte per weight of the whole leaf while it is ranked (the shards'
    candidates). In layer scope the layers of concrete params that each lie on one device are
    ranked from up to 4 threads at once (see ``_concurrently``).

    Args:
      params: a pytree of parameters.
      sparsity: the fraction to prune, in ``[0, 1)`` (may be traced under ``jax.jit``), or, for
        ``scope='layer'``, a mapping from a leaf path, a layer path, a stacked slice
        (``'path[i]'``) or an ``fnmatch`` pattern to a fraction, resolved as ``q`` is in
        :func:`compute_masks`; prunable layers a mapping does not name are not pruned.
      scope: ``'layer'`` prunes that fraction of every prunable leaf (of every slice of a
        stacked leaf); ``'global'`` ranks the weights of all prunable leaves together, so
        sensitive layers can keep more (a stacked leaf's slices each count once).
      previous: masks from an earlier round.
      where: ``where(path, leaf) -> bool`` choosing the prunable leaves.
      stacked: ``{pattern: axis}`` for stacked layers, as in :func:`compute_masks`.

    Returns:
      A mask tree like :func:`compute_masks`'s.

    Raises:
      ValueError: on ``sparsity`` outside ``[0, 1)``, an unknown ``scope``, a mapping with
        ``scope='global'`` or naming no prunable layer, ``previous`` not matching ``params``,
        NaN or inf in a prunable weight, no prunable leaf, or more than ``2**31 - 1`` weights in
        one scope.
      TypeError: if ``sparsity`` is not a real number or a ``previous`` mask is not boolean.

    >>> import numpy as np
    >>> params = {'a': {'kernel': np.array([[4.0, -1.0], [2.0, 3.0]])},
    ...           'b': {'kernel': np.array([[0.5, 5.0]])}}
    >>> masks_for_sparsity(params, 0.5)['a']['kernel'].tolist()
    [[True, False], [False, True]]
    >>> m = masks_for_sparsity(params, 0.5, scope='global')
    >>> m['b']['kernel'].tolist(), m['a']['kernel'].tolist()
    ([[False, True]], [[True, False], [False, True]])
    >>> masks_for_sparsity(params, {'b': 0.5})['a']['kernel'].tolist()  # 'a' is not named
    [[True, True], [True, True]]
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
    if isinstance(sparsity, Mapping) and scope != "layer":
        raise ValueError(
            "a sparsity mapping needs scope='layer'; scope='global' ranks every prunable weight "
            "together under one sparsity."
        )
    if not isinstance(sparsity, Mapping):
        check_scalar(sparsity, name="sparsity", low=0.0, high=1.0, closed_high=False)
    # The NaN check rides in the ranking's first pass over the weights: checked after it.
    prunable, axes = _prepare(params, previous, where, stacked, finite=False)
    prev_of = dict(leaves_with_paths(previous)) if previous is not None else {}
    chosen = [(p, jnp.asarray(leaf)) for p, leaf in leaves_with_paths(params) if prunable[p]]

    placements = placements_of([leaf for _, leaf in chosen])
    concrete = not any(is_traced(leaf) for _, leaf in chosen)
    nonfinite: dict[str, jax.Array] = {}  # per ranked leaf, its count of NaN and inf

    def prev(path: str) -> jax.Array | None:
        return jnp.asarray(prev_of[path], dtype=bool) if path in prev_of else None

    if scope == "layer":
        units = layer_units(params, prunable, axes)
        frac = per_unit(sparsity, units, name="sparsity", high=1.0, closed_high=False)
        counts_of: dict[str, Any] = {}  # per ranked leaf, how many to prune (per slice)
        place_of: dict[str, Placement] = {}
        for i, (p, leaf) in enumerate(chosen):
            axis = axes.get(p)
            slices = [u for u in units if u.path == p]
            if not any(u in frac for u in slices):
                continue
            n = leaf.size // (1 if axis is None else leaf.shape[axis])
            check_countable(f"params[{p!r}]", n)
            counts = _as_int32([_pruned_count(frac.get(u, 0.0), n) for u in slices])
            counts_of[p] = counts[0] if axis is None else counts
            place_of[p] = None if placements is None else placements[i]
        counts_of = _counts_placed(counts_of, place_of)
        leaf_of = dict(chosen)
        jobs = {  # path: the ranking's arguments, one leaf each
            p: (
                (leaf_of[p],),
                (prev(p),),
                (axes.get(p),),
                counts_of[p],
                None if placements is None else (place_of[p],),
                concrete,
            )
            for p in counts_of
        }
        # Tracers stay on the tracing thread, and a leaf over several devices ranks with
        # collectives, which XLA's CPU runtime can deadlock on when two calls hold them at once.
        whole = concrete and all(len(leaf.sharding.device_set) == 1 for _, leaf in chosen)
        ranked = _concurrently(_ranked_settled, list(jobs.values()), threads=4 if whole else 1)
        keep_of = {}
        for p, ((keep,), bad) in zip(jobs, ranked, strict=True):
            keep_of[p] = keep
            nonfinite.update(zip([p], bad, strict=False))
    else:
        total = sum(leaf.size for _, leaf in chosen)
        check_countable("the prunable leaves together", total)
        keeps, bad = compiled(placements)(
            tuple(leaf for _, leaf in chosen),
            tuple(prev(p) for p, _ in chosen),
            (None,) * len(chosen),
            _as_int32([_pruned_count(sparsity, total)])[0],
            placements,
            concrete,
        )
        keep_of = {p: k for (p, _), k in zip(chosen, keeps, strict=True)}
        nonfinite.update(zip([p for p, _ in chosen], bad, strict=False))
    # Leaves a mapping leaves unranked are checked too, as compute_masks checks every one.
    check_finite({p: leaf for p, leaf in chosen if p not in keep_of})
    for path, count in zip(nonfinite, jax.device_get(list(nonfinite.values())), strict=True):
        if count:
            raise_nonfinite(path)

    def one(path: str, leaf: Any, prev: Any) -> Any:
        if path not in keep_of:
            return _keep_all(leaf, prev)
        keep = keep_of[path]
        return keep if prev is None else keep & jnp.asarray(prev, dtype=bool)

    return _leafwise(one, params, previous)


def _counts_placed(counts: dict[str, Any], place_of: dict[str, Placement]) -> dict[str, Any]:
    """The counts, those of each leaf split over a mesh put on every device of it, in one call.

    Left as NumPy, each ranking's call would copy its count there on its own, through a slower
    path: side by side on 2 CPU devices, counts placed beforehand saved 0.3-0.6 ms a leaf.
    """
    meshes = {p: s.mesh for p, s in place_of.items() if s is not None}
    split = [p for p in meshes if not is_traced(counts[p])]
    everyone = [jax.sharding.NamedSharding(meshes[p], jax.sharding.PartitionSpec()) for p in split]
    placed = jax.device_put([counts[p] for p in split], everyone) if split else []
    return {**counts, **dict(zip(split, placed, strict=True))}


def _ranked_settled(*job) -> Any:
    """The ranking ``job`` asks for, waited for where the leaf lies over several CPU devices."""
    leaves, placements = job[0], job[4]
    return settled(compiled(placements)(*job), leaves[0])


def _concurrently(fn, jobs: list[tuple], threads: int = 4) -> list:
    """``[fn(*job) for job in jobs]``, the calls made from up to ``threads`` threads at once.

    For the per-layer rankings of concrete leaves: on a CPU, JAX runs one thread's calls one
    after the other, and a ranking's searches over a few thousand entries keep one core busy
    while the others wait; calls from several threads run side by side (48 layers of 2**20
    weights took 0.71-0.74x the time from 4 threads in four runs on 2 cores, 0.78x from 2 in
    three of them). The jobs' arrays are placed already (a worker's calls follow them, not its
    own default device); the calling thread's promotion rules, which are thread-local and
    shape the trace, are set in the workers too.
    """
    if len(jobs) < 2 or threads < 2:
        return [fn(*job) for job in jobs]
    config: Any = jax.config  # read as attributes, its values are this thread's (mypy: untyped)
    dtypes, ranks = config.jax_numpy_dtype_promotion, config.jax_numpy_rank_promotion

    def call(job: tuple) -> Any:
        with jax.numpy_dtype_promotion(dtypes), jax.numpy_rank_promotion(ranks):
            return fn(*job)

    with ThreadPoolExecutor(min(threads, len(jobs))) as pool:
        return list(pool.map(call, jobs))


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """Returns new params with the pruned entries set to exactly zero.

    Floating-point array leaves are multiplied out by their masks (``jnp.where``, so ``-0.0`` and
    NaN do not leak through); other leaves (integers, non-arrays) are returned as they are. The
    input is not modified, and no leaf changes type, dtype or placement: a JAX array comes back
    as a JAX array of its dtype and sharding, a NumPy array as a NumPy array of its dtype (so
    ``float64`` stays ``float64`` even with JAX's x64 mode off, where a JAX array could not hold
    it). Under ``jax.jit`` every leaf is a JAX value, with JAX's dtype rules.

    Args:
      params: a pytree of parameters.
      masks: a boolean mask tree matching ``params`` (see :func:`compute_masks`).

    Returns:
      A new pytree with the structure of ``params``.

    Raises:
      ValueError: if ``masks`` does not match ``params`` in structure or leaf shapes, or a mask
        is sharded otherwise than its leaf.
      TypeError: if a mask is not boolean (a float mask's ``0.3`` is not read as ``True``).

    >>> import numpy as np
    >>> apply_masks({'w': np.array([[1.0, 2.0]])}, {'w': np.array([[True, False]])})['w'].tolist()
    [[1.0, 0.0]]
    """
    check_masks(params, masks)

    def one(leaf: Any, mask: Any) -> Any:
        if not (is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating)):
            return leaf
        if isinstance(leaf, (np.ndarray, np.generic)) and not is_traced(mask):
            return np.where(np.asarray(mask), leaf, np.zeros((), leaf.dtype))
        return jnp.where(mask, leaf, jnp.zeros((), leaf.dtype))

    return jax.tree.map(one, params, masks)
