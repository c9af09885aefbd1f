"""Evaluation, per-layer sensitivity scans and plots.

:func:`sensitivity` reproduces the layer-by-layer scan of Han et al. 2015, Fig. 6:
prune one layer at a time over a grid of thresholds and measure accuracy without retraining,
which shows how much each layer tolerates. The whole scan is one compiled call.

The plots of these results are in :mod:`jaxprune.plots`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._options import check_count
from jaxprune._tree import (
    PyTree,
    Stacked,
    Where,
    layer_units,
    leaves_with_paths,
    path_str,
    prunable_paths,
    stacked_axes,
)
from jaxprune.masks import apply_masks, compute_masks, masks_for_sparsity

__all__ = ["Sensitivity", "accuracy", "sensitivity"]

ApplyFn = Callable[[PyTree, Any], Any]  # (params, x_batch) -> logits


def _check_data(x: Any, y: Any, batch_size: Any) -> None:
    check_count(batch_size, name="batch_size")
    if np.ndim(y) != 1 or len(x) != len(y):
        raise ValueError(
            f"y has shape {np.shape(y)} and x has {len(x)} examples; expected labels shaped "
            f"({len(x)},)."
        )
    if len(x) == 0:
        raise ValueError("x is empty; accuracy needs at least one example.")


def _padded_batches(x: Any, y: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Splits data into equal batches ``(n_batches, b, ...)`` plus a validity mask.

    The last batch is padded so that every batch has one shape and the compiled function is
    reused; padded rows are masked out of the counts.
    """
    x, y = np.asarray(x), np.asarray(y)
    b = min(batch_size, len(x))
    n_batches = -(-len(x) // b)
    pad = n_batches * b - len(x)
    valid = np.arange(n_batches * b) < len(x)
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros(pad, y.dtype)])
    shape = (n_batches, b)
    return x.reshape(shape + x.shape[1:]), y.reshape(shape), valid.reshape(shape)


def _count_correct(apply_fn: ApplyFn, params: PyTree, xs, ys, valid) -> jax.Array:
    """Correct predictions over stacked batches, as one ``lax.scan``."""

    def body(total, batch):
        xb, yb, vb = batch
        hits = (jnp.argmax(apply_fn(params, xb), axis=-1) == yb) & vb
        return total + jnp.sum(hits, dtype=jnp.int32), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.int32), (xs, ys, valid))
    return total


_count_correct_jit = jax.jit(_count_correct, static_argnums=0)


def accuracy(apply_fn: ApplyFn, params: PyTree, x: Any, y: Any, *, batch_size: int = 1000) -> float:
    """Fraction of examples whose arg-max logit equals the label, evaluated in batches under jit.

    The data are padded to whole batches and scanned in one compiled call; calling again with the
    same ``apply_fn`` object and shapes does not recompile (so create ``apply_fn`` once, not a
    new lambda per call). The error rate is ``1 - accuracy(...)``.

    Args:
      apply_fn: ``apply_fn(params, x_batch) -> logits`` of shape ``(batch, classes)``; must be
        hashable (functions, lambdas and ``model.apply`` are).
      params: the parameters passed to ``apply_fn``.
      x: inputs, batched along axis 0.
      y: integer labels, shape ``(len(x),)``.
      batch_size: examples per compiled batch.

    Returns:
      The accuracy in ``[0, 1]``.

    Raises:
      ValueError: if ``x`` and ``y`` differ in length, ``x`` is empty, or ``batch_size < 1``.

    Example:
      >>> import numpy as np
      >>> def apply_fn(w, x): return x @ w
      >>> x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
      >>> accuracy(apply_fn, np.eye(2, dtype=np.float32), x, np.array([0, 1, 1]), batch_size=2)
      0.666...
    """
    _check_data(x, y, batch_size)
    xs, ys, valid = _padded_batches(x, y, batch_size)
    return int(_count_correct_jit(apply_fn, params, xs, ys, valid)) / len(x)


class Sensitivity(NamedTuple):
    """The result of :func:`sensitivity`: accuracy with one layer pruned at a time.

    Attributes:
      layers: the scanned leaf paths, e.g. ``('fc1/kernel', 'fc2/kernel')``.
      grid_kind: ``'q'`` (Han's quality parameter) or ``'sparsity'`` (target fraction pruned).
      grid: the scanned values, shape ``(Q,)``.
      kept_fraction: measured fraction of the layer's weights kept, shape ``(L, Q)``.
      accuracy: accuracy with only that layer pruned, shape ``(L, Q)``.
      baseline: accuracy of the unpruned params.
    """

    layers: tuple[str, ...]
    grid_kind: str
    grid: np.ndarray
    kept_fraction: np.ndarray
    accuracy: np.ndarray
    baseline: float

    def rows(self) -> list[dict[str, Any]]:
        """The table as one dict per (layer, grid value).

        Keys: ``layer``, ``q`` (``None`` for a sparsity scan), ``kept_fraction``, ``accuracy``.
        """
        return [
            {
                "layer": layer,
                "q": float(g) if self.grid_kind == "q" else None,
                "kept_fraction": float(self.kept_fraction[i, j]),
                "accuracy": float(self.accuracy[i, j]),
            }
            for i, layer in enumerate(self.layers)
            for j, g in enumerate(self.grid)
        ]

    def __str__(self) -> str:
        lines = [f"baseline accuracy {100 * self.baseline:.2f}%", "layer  q  kept %  accuracy %"]
        for r in self.rows():
            q = "-" if r["q"] is None else f"{r['q']:g}"
            lines.append(
                f"{r['layer']}  {q}  {100 * r['kept_fraction']:.2f}  {100 * r['accuracy']:.2f}"
            )
        return "\n".join(lines)


def _check_grid(qs: Any, sparsities: Any) -> tuple[str, np.ndarray]:
    if (qs is None) == (sparsities is None):
        raise ValueError(
            "sensitivity needs exactly one of qs= (Han's q values) or sparsities= (pruned "
            f"fractions), got qs={qs!r}, sparsities={sparsities!r}."
        )
    kind, values = ("q", qs) if qs is not None else ("sparsity", sparsities)
    grid = np.asarray(values, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError(f"{kind} grid has shape {grid.shape}, expected a non-empty 1-D sequence.")
    ok = (grid >= 0) & np.isfinite(grid) if kind == "q" else (grid >= 0) & (grid < 1)
    if not ok.all():
        wanted = "finite and >= 0" if kind == "q" else "in [0, 1)"
        name = "qs" if kind == "q" else "sparsities"
        raise ValueError(f"{name} must be {wanted}, got {grid[~ok][:5].tolist()}.")
    return kind, grid.astype(np.float32)


def _scan_layers(
    apply_fn: ApplyFn,
    where: Where | None,
    stacked: tuple[tuple[str, int], ...],
    kind: str,
    grid_batch: int,
    params: PyTree,
    layer_ids: jax.Array,
    values: jax.Array,
    xs: jax.Array,
    ys: jax.Array,
    valid: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Kept fraction and correct count for each ``(layer_id, value)`` grid point."""
    prunable = prunable_paths(params, where)
    axes = stacked_axes(params, dict(stacked), prunable)
    shapes = {p: leaf.shape for p, leaf in leaves_with_paths(params)}
    ids: dict[str, np.ndarray] = {}  # per prunable leaf: the layer id of each entry's layer
    for i, unit in enumerate(layer_units(params, prunable, axes)):
        if unit.index is None:
            ids[unit.path] = np.full((1,) * len(shapes[unit.path]), i, np.int32)
        elif unit.index == 0:
            shape = [1] * len(shapes[unit.path])
            shape[axes[unit.path]] = shapes[unit.path][axes[unit.path]]
            ids[unit.path] = (i + np.arange(shape[axes[unit.path]], dtype=np.int32)).reshape(shape)

    def one_point(point):
        layer_id, value = point
        if kind == "q":
            masks = compute_masks(params, value, where=where, stacked=dict(stacked))
        else:
            masks = masks_for_sparsity(
                params, value, scope="layer", where=where, stacked=dict(stacked)
            )

        # Only the selected layer is pruned; the others keep every weight (Han et al. 2015,
        # Fig. 6 prunes layers one at a time). The layer id is traced, so one trace covers all.
        def select(kp, m):
            i = ids.get(path_str(kp))
            return m if i is None else jnp.where(layer_id == i, m, True)

        masks = jax.tree_util.tree_map_with_path(select, masks)
        kept = jnp.zeros(())
        for kp, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
            i = ids.get(path_str(kp))
            if i is not None:  # the mean over the selected layer's entries (zero elsewhere)
                hit = jnp.broadcast_to(layer_id == i, m.shape)
                n_hit = jnp.sum(hit, dtype=jnp.float32)
                kept += jnp.sum(hit & m, dtype=jnp.float32) / jnp.maximum(n_hit, 1.0)
        return kept, _count_correct(apply_fn, apply_masks(params, masks), xs, ys, valid)

    # lax.map vmaps grid_batch points at a time: the grid is batched, memory stays bounded.
    return jax.lax.map(one_point, (layer_ids, values), batch_size=grid_batch)


_scan_layers_jit = jax.jit(_scan_layers, static_argnums=(0, 1, 2, 3, 4))


def sensitivity(
    apply_fn: ApplyFn,
    params: PyTree,
    x: Any,
    y: Any,
    *,
    qs: Sequence[float] | None = None,
    sparsities: Sequence[float] | None = None,
    where: Where | None = None,
    stacked: Stacked | None = None,
    batch_size: int = 500,
    grid_batch: int = 4,
) -> Sensitivity:
    """Accuracy with one layer pruned at a time, over a grid, without retraining.

    Han et al. 2015, Fig. 6: each prunable layer is pruned alone, every other weight
    is kept, and the pruned network is evaluated as is. Layers whose accuracy falls early are
    sensitive and deserve a smaller ``q``. Masks come from :func:`jaxprune.masks.compute_masks`
    (grid of ``qs``) or :func:`jaxprune.masks.masks_for_sparsity` with ``scope='layer'`` (grid of
    ``sparsities``). All (layer, value) points run in one jitted call: the layer and value
    are traced, ``grid_batch`` points are vmapped together, and the data are scanned in batches.

    Args:
      apply_fn: ``apply_fn(params, x_batch) -> logits``; must be hashable.
      params: a params tree (Linen dict or NNX state).
      x: evaluation inputs.
      y: integer labels, shape ``(len(x),)``.
      qs: Han's quality parameters to scan (``>= 0``); give this or ``sparsities``.
      sparsities: fractions of each layer to prune, in ``[0, 1)``.
      where: ``where(path, leaf) -> bool`` choosing the layers; default
        :func:`jaxprune.default_where`. It is also called on traced leaves, so it must decide by
        path, shape or dtype, not by values.
      stacked: ``{pattern: axis}`` for stacked layers (see :func:`jaxprune.compute_masks`): each
        slice is scanned as its own layer, named ``'path[i]'``.
      batch_size: examples per evaluation batch.
      grid_batch: grid points evaluated together (memory grows with ``grid_batch * batch_size``).

    Returns:
      A :class:`Sensitivity` table; ``.rows()`` lists (layer, q, kept_fraction, accuracy).

    Raises:
      ValueError: on a bad grid (both or neither given, negative ``q``, sparsity outside
        ``[0, 1)``), no prunable layer, mismatched ``x``/``y``, or ``batch_size``/``grid_batch``
        below 1.

    Example:
      >>> import numpy as np
      >>> def apply_fn(p, x): return x @ p["kernel"]
      >>> params = {"kernel": np.array([[0.5, 1.0], [3.0, 0.0]], np.float32)}
      >>> x = np.eye(2, dtype=np.float32)
      >>> table = sensitivity(apply_fn, params, x, np.array([1, 0]), qs=[0.0, 1.0])
      >>> table.layers, table.kept_fraction.tolist(), table.accuracy.tolist()
      (('kernel',), [[1.0, 0.25]], [[1.0, 0.5]])
    """
    kind, grid = _check_grid(qs, sparsities)
    _check_data(x, y, batch_size)
    check_count(grid_batch, name="grid_batch")
    prunable = prunable_paths(params, where)
    axes = stacked_axes(params, stacked, prunable)
    layers = tuple(u.name for u in layer_units(params, prunable, axes))
    stacked_key = tuple(sorted((stacked or {}).items()))
    n_layers, n_grid = len(layers), len(grid)
    layer_ids = np.repeat(np.arange(n_layers, dtype=np.int32), n_grid)
    values = np.tile(grid, n_layers)
    xs, ys, valid = _padded_batches(x, y, batch_size)
    kept, correct = _scan_layers_jit(
        apply_fn, where, stacked_key, kind, grid_batch, params, layer_ids, values, xs, ys, valid
    )
    return Sensitivity(
        layers=layers,
        grid_kind=kind,
        grid=grid,
        kept_fraction=np.asarray(kept, np.float64).reshape(n_layers, n_grid),
        accuracy=(np.asarray(correct, np.float64) / len(x)).reshape(n_layers, n_grid),
        baseline=accuracy(apply_fn, params, x, y, batch_size=batch_size),
    )
