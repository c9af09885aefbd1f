"""N:M structured sparsity: in every group of ``m`` consecutive weights, keep the ``n`` largest.

An N:M mask is what sparse matrix units consume: NVIDIA's sparse tensor cores (Ampere and later,
reached through cuSPARSELt or TensorRT) multiply 2:4 operands (1:2 for TF32) at up to twice the
dense rate, and AMD's CDNA 3 matrix cores take 2:4 too. A masked dense product runs at dense
speed on every XLA backend (JAX has no public N:M matmul), so using those units takes a kernel
outside XLA. On CPU there are none: an N:M mask is just unstructured sparsity there, which saves
bytes once exported with :func:`jaxprune.to_bcoo` or :func:`jaxprune.save`, and no time.

The groups run along a kernel's input (contracting) axis, the axis the hardware compresses: axis
0 of a Dense kernel ``(in, out)``, the in-channel axis ``-2`` of a Conv kernel ``(h, w, in,
out)``. Masks are built in one pass of comparisons within each group (``m`` is small), under
``jax.jit`` too, with nothing sorted and nothing gathered to the host, so sharded kernels stay
sharded.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._tree import (
    PyTree,
    Stacked,
    Where,
    check_finite,
    check_like,
    is_array,
    last_key,
    leaves_with_paths,
    path_matches,
    path_str,
    prunable_paths,
    slice_name,
    stacked_axes,
)

AxisSpec = int | Mapping[str, int] | None

DETECTED_M = (2, 4, 8, 16)
HALF_DENSE_M = (2, 4, 8)  # 1:2, 2:4, 4:8: the patterns summarize reports
"""The group sizes :func:`nm_pattern` tries."""

_PRUNED_SCORE = -1.0  # below every magnitude, so a pruned connection is never kept again


def _as_int(value: Any, *, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got the bool {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an int (a static group size, not a traced or float value), got "
            f"{type(value).__name__}: {value!r}."
        ) from None


def check_pattern(n: Any, m: Any) -> tuple[int, int]:
    """Validates an N:M pattern eagerly and returns it as two Python ints."""
    n, m = _as_int(n, name="n"), _as_int(m, name="m")
    if m < 1 or not 1 <= n <= m:
        raise ValueError(
            f"an N:M pattern needs 1 <= n <= m, got n={n}, m={m}; e.g. n=2, m=4 keeps 2 of "
            "every 4 weights."
        )
    return n, m


def default_axis(path: str, ndim: int) -> int:
    """The axis :func:`nm_masks` groups along unless told otherwise, as a non-negative index.

    ``ndim - 2`` (the input axis of Dense and Conv kernels); ``0`` for a 1-D leaf; ``ndim - 1``
    (the features) for a leaf named ``embedding``: a lookup is a gather that no sparse unit
    speeds up, and a tied output head (``Embed.attend``) contracts the features.

    >>> default_axis('Dense_0/kernel', 2), default_axis('Conv_0/kernel', 4)
    (0, 2)
    >>> default_axis('Embed_0/embedding', 2)
    1
    """
    if ndim < 2:
        return 0
    return ndim - 1 if last_key(path) == "embedding" else ndim - 2


def _axis_of(spec: AxisSpec, path: str, shape: tuple[int, ...]) -> int:
    ndim = len(shape)
    if ndim == 0:
        raise ValueError(f"params[{path!r}] is a scalar; an N:M pattern needs an axis to group.")
    if spec is None:
        return default_axis(path, ndim)
    if isinstance(spec, Mapping):
        hits = [k for k in spec if path_matches(path, k)]
        if len(hits) > 1:
            raise ValueError(
                f"axis has several patterns {hits} matching params[{path!r}]; keep one, or name "
                "the leaf by its full path."
            )
        if not hits:
            return default_axis(path, ndim)
        axis, name = spec[hits[0]], f"axis[{hits[0]!r}]"
    else:
        axis, name = spec, "axis"
    axis = _as_int(axis, name=name)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{name} = {axis} is out of range for params[{path!r}] of shape {shape}; pass an "
            f"axis in [{-ndim}, {ndim})."
        )
    return axis % ndim


def _check_axis_mapping(spec: AxisSpec, paths: list[str]) -> None:
    if not isinstance(spec, Mapping):
        return
    unused = [k for k in spec if not any(path_matches(p, k) for p in paths)]
    if unused:
        raise ValueError(
            f"axis names {unused}, which match no prunable leaf; prunable leaves are {paths[:8]}."
        )


def _group_shape(shape: tuple[int, ...], axis: int, m: int) -> tuple[int, ...]:
    return (*shape[:axis], shape[axis] // m, m, *shape[axis + 1 :])


def _check_groups(path: str, shape: tuple[int, ...], axis: int, m: int) -> None:
    if shape[axis] % m:
        raise ValueError(
            f"m={m} does not divide axis {axis} of params[{path!r}] (shape {shape}, length "
            f"{shape[axis]}): N:M groups are m consecutive weights along that axis. Pick an m "
            f"that divides {shape[axis]}, another axis=, or leave the leaf dense with "
            f"where=jaxprune.excluding({path!r})."
        )


def _keep_top_n(w: jax.Array, prev: jax.Array | None, n: int, m: int, axis: int) -> jax.Array:
    """Keeps the ``n`` largest ``|w|`` of each group of ``m`` along ``axis`` (ties: later wins)."""
    score = jnp.abs(w.astype(jnp.float32))  # -0.0 ranks as 0.0
    if prev is not None:
        score = jnp.where(prev, score, _PRUNED_SCORE)
    g = score.reshape(_group_shape(w.shape, axis, m))
    pos = jax.lax.broadcasted_iota(jnp.int32, g.shape, axis + 1)
    # rank = how many of the group outrank an entry; m unrolled compares, no (m, m) temporary.
    rank = jnp.zeros(g.shape, jnp.int32)
    for j in range(m):
        other = jax.lax.slice_in_dim(g, j, j + 1, axis=axis + 1)
        rank = rank + ((other > g) | ((other == g) & (j > pos))).astype(jnp.int32)
    keep = (rank < n).reshape(w.shape)
    return keep if prev is None else keep & prev


# One fused kernel per leaf shape instead of 3 * m eager ops; inlined under an outer jit.
_keep_top_n_jit = jax.jit(_keep_top_n, static_argnums=(2, 3, 4))


def nm_masks(
    params: PyTree,
    n: int,
    m: int,
    *,
    axis: AxisSpec = None,
    previous: PyTree | None = None,
    where: Where | None = None,
    stacked: Stacked | None = None,
) -> PyTree:
    """N:M masks: in every group of ``m`` consecutive weights along ``axis``, keep the ``n`` largest.

    Each prunable leaf is cut into groups of ``m`` neighbours along its input axis; in each group
    the ``n`` weights of largest float32 magnitude are kept and the others pruned, so every layer
    keeps ``n / m`` of its weights. Among equal magnitudes the earlier entry (lower index along
    ``axis``) is pruned first, as in :func:`jaxprune.masks_for_sparsity`. With ``previous``, a
    pruned connection stays pruned (Han et al. 2015): it ranks below every weight, so a group with
    fewer than ``n`` survivors keeps just those, and the mask still satisfies N:M (at most ``n``
    per group; sparse units store the missing ones as explicit zeros).

    2:4 is the pattern of NVIDIA's sparse tensor cores (Ampere and later, via cuSPARSELt); XLA on
    CPU has no N:M kernels, so there the mask saves storage (:func:`jaxprune.to_bcoo`,
    :func:`jaxprune.save`) but not time (see the module docstring). ``n`` and ``m`` are static: under ``jax.jit`` pass them
    as static arguments; the weights may be traced. Stacked leaves (``stacked=``) need nothing
    special, since groups never span layers; their stacking axis cannot be the group axis.

    Args:
      params: a Linen params dict, an NNX ``nnx.state(model, nnx.Param)`` or any pytree.
      n: weights kept per group, ``1 <= n <= m``.
      m: the group size; it must divide the length of every prunable leaf along its axis. The
        ``m`` comparisons per weight are unrolled, so keep it to a few dozen.
      axis: the axis the groups run along. Default: the input axis of each leaf, ``-2`` (axis 0
        of a Dense kernel ``(in, out)``, the in-channels of a Conv kernel ``(h, w, in, out)``),
        ``0`` for a 1-D leaf, and ``-1`` (the features) for an ``embedding`` table (see
        :func:`default_axis`). An int applies to every leaf; a mapping ``{pattern: axis}``
        (patterns match like ``stacked``'s) sets it per leaf, e.g. ``{'*/query': 0}`` for
        attention projections ``(features, heads, head_dim)``, whose input axis is 0.
      previous: masks from an earlier round; pruned connections stay pruned.
      where: ``where(path, leaf) -> bool`` choosing the prunable leaves; default
        :func:`jaxprune.default_where`. Other array leaves get all-``True`` masks (and-ed with
        ``previous``), non-array leaves ``True``.
      stacked: ``{pattern: axis}`` for scan-stacked layers, as in :func:`jaxprune.compute_masks`.

    Returns:
      A mask tree like :func:`jaxprune.compute_masks`'s.

    Raises:
      TypeError: if ``n``, ``m`` or an axis is not an int, or ``where`` selects a leaf that is not
        a floating-point array.
      ValueError: on ``n`` outside ``[1, m]``; naming the leaf: an ``m`` that does not divide its
        axis, an axis out of range or equal to its ``stacked`` axis, a scalar leaf, NaN or inf
        in its weights (concrete inputs only); also on an ``axis`` mapping naming no prunable
        leaf, ``previous`` not matching ``params`` and no prunable leaf.

    >>> import numpy as np
    >>> kernel = np.array([[0.1, 5.0], [-3.0, 0.2], [2.0, -0.3], [0.4, 1.0]])  # (in=4, out=2)
    >>> nm_masks({'Dense_0': {'kernel': kernel}}, 2, 4)['Dense_0']['kernel'].T.astype(int).tolist()
    [[0, 1, 1, 0], [1, 0, 0, 1]]
    >>> nm_pattern(nm_masks({'kernel': kernel}, 1, 2)['kernel'], axis=0)
    (1, 2)
    """
    n, m = check_pattern(n, m)
    prunable = prunable_paths(params, where)
    stack_axes = stacked_axes(params, stacked, prunable)
    if previous is not None:
        check_like(params, previous, name="previous")
    entries = leaves_with_paths(params)
    _check_axis_mapping(axis, [p for p, _ in entries if prunable[p]])
    axes: dict[str, int] = {}
    for path, leaf in entries:
        if not prunable[path]:
            continue
        shape = tuple(leaf.shape)
        a = _axis_of(axis, path, shape)
        if stack_axes.get(path) == a:
            raise ValueError(
                f"axis {a} of params[{path!r}] is its stacked axis (the layers); N:M groups run "
                "within a layer: pass another axis=."
            )
        _check_groups(path, shape, a, m)
        axes[path] = a
    check_finite({p: leaf for p, leaf in entries if p in axes})

    def one(keypath: tuple, leaf: Any, prev: Any) -> Any:
        path = path_str(keypath)
        if prev is not None:
            prev = jnp.asarray(prev, dtype=bool)
        if path in axes:
            return _keep_top_n_jit(jnp.asarray(leaf), prev, n, m, axes[path])
        if not is_array(leaf):
            return True
        full = jnp.ones_like(leaf, dtype=bool)  # placed (sharded) like the leaf
        return full if prev is None else full & prev

    if previous is None:
        return jax.tree_util.tree_map_with_path(lambda kp, x: one(kp, x, None), params)
    return jax.tree_util.tree_map_with_path(one, params, previous)


def nm_pattern(
    mask: Any, *, axis: int = -2, ms: tuple[int, ...] = DETECTED_M
) -> tuple[int, int] | None:
    """The tightest N:M pattern a mask satisfies along ``axis``, or None if it satisfies none.

    For each ``m`` in ``ms`` that divides the axis, ``n`` is the most weights any group of ``m``
    keeps; patterns with ``n == m`` say nothing and are dropped. Of the rest the one of lowest
    density ``n / m`` is returned, the smaller ``m`` on a tie: a 2:4 mask also satisfies 4:8 and
    gives ``(2, 4)``. An unstructured mask can satisfy a pattern by chance (at high sparsity,
    say 5:16). Runs on the host (NumPy); it is meant for reports.

    Args:
      mask: a boolean array (a 1-D mask is grouped along its only axis).
      axis: the axis the groups run along, as in :func:`nm_masks`.
      ms: the group sizes to try.

    Returns:
      ``(n, m)``, or None.

    >>> import numpy as np
    >>> nm_pattern(np.array([[1, 1, 0, 0], [0, 1, 1, 0]], bool).T)  # not 1:2: (1, 1) is a pair
    (2, 4)
    >>> nm_pattern(np.ones((4, 2), bool)) is None
    True
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 0:
        return None
    if mask.ndim == 1:
        axis = 0
    elif not -mask.ndim <= axis < mask.ndim:
        raise ValueError(f"axis {axis} is out of range for a mask of shape {mask.shape}.")
    axis %= mask.ndim
    best: tuple[float, int, int] | None = None
    for m in ms:
        if m < 2 or mask.shape[axis] % m or mask.size == 0:
            continue
        groups = mask.reshape(_group_shape(mask.shape, axis, m))
        n = int(groups.sum(axis=axis + 1).max())
        if n < m and (best is None or (n / m, m) < best[:2]):
            best = (n / m, m, n)
    return None if best is None else (best[2], best[1])


@functools.partial(jax.jit, static_argnums=(1, 2))
def _group_maxima(mask: jax.Array, axis: int, stack: int | None) -> dict[int, jax.Array]:
    """For each half-dense ``m`` dividing the axis: the most kept per group of ``m`` (per slice).

    One compiled function per shape: eagerly, each reduction would compile on its own.
    """
    maxima = {}
    for m in HALF_DENSE_M:
        if mask.shape[axis] % m or mask.size == 0:
            continue
        groups = mask.reshape(_group_shape(mask.shape, axis, m))
        sums = jnp.sum(groups, axis=axis + 1, dtype=jnp.int32)
        maxima[m] = jnp.max(sums, axis=tuple(d for d in range(sums.ndim) if d != stack))
    return maxima


def slice_patterns(mask: Any, axis: int, stack: int | None = None) -> list[tuple[int, int] | None]:
    """The half-dense N:M pattern (1:2, 2:4 or 4:8) ``mask`` satisfies along ``axis``, or None.

    What :func:`jaxprune.summarize` reports: the patterns sparse tensor cores run, the tightest
    first. Unlike :func:`nm_pattern` it runs as reductions on the mask where it lies (sharded
    masks stay sharded) and fetches a few counts. With ``stack``, one entry per index of that
    axis (a stacked leaf's slices); else a one-entry list. A slice with nothing kept gives None.

    >>> import numpy as np
    >>> slice_patterns(np.array([[1, 0], [0, 0], [1, 1], [0, 1]], bool), 0)
    [(2, 4)]
    """
    mask = jnp.asarray(mask, dtype=bool)
    n_slices = 1 if stack is None else mask.shape[stack]
    maxima = jax.device_get(_group_maxima(mask, axis, stack))
    fetched = {m: np.broadcast_to(n, (n_slices,)) for m, n in maxima.items()}
    return [
        next(((m // 2, m) for m, n in fetched.items() if 0 < n[i] <= m // 2), None)
        for i in range(n_slices)
    ]


def nm_patterns(
    params: PyTree,
    masks: PyTree,
    *,
    axis: AxisSpec = None,
    where: Where | None = None,
    stacked: Stacked | None = None,
) -> dict[str, tuple[int, int] | None]:
    """The N:M pattern (:func:`nm_pattern`) of each prunable leaf's mask, keyed by its path.

    A stacked leaf gets one entry per slice, named ``'path[i]'`` as in
    :func:`jaxprune.summarize`'s rows. Axes default as in :func:`nm_masks`.

    >>> import numpy as np
    >>> params = {'Dense_0': {'kernel': np.arange(8.0).reshape(4, 2)}}
    >>> nm_patterns(params, nm_masks(params, 1, 4))
    {'Dense_0/kernel': (1, 4)}
    """
    check_like(params, masks, name="masks")
    prunable = prunable_paths(params, where)
    stack_axes = stacked_axes(params, stacked, prunable)
    mask_of = dict(leaves_with_paths(masks))
    out: dict[str, tuple[int, int] | None] = {}
    for path, leaf in leaves_with_paths(params):
        if not prunable[path]:
            continue
        shape = tuple(leaf.shape)
        mask = np.broadcast_to(np.asarray(mask_of[path], dtype=bool), shape)
        a = _axis_of(axis, path, shape)
        if path not in stack_axes:
            out[path] = nm_pattern(mask, axis=a)
            continue
        s = stack_axes[path]
        for i in range(shape[s]):
            part = np.take(mask, i, axis=s)
            out[slice_name(path, i)] = nm_pattern(part, axis=a - (a > s))
    return out
