"""Evaluation, per-layer sensitivity scans and plots.

:func:`sensitivity` reproduces the layer-by-layer scan of Han et al. 2015, Fig. 6:
prune one layer at a time over a grid of thresholds and measure accuracy without retraining,
which shows how much each layer tolerates. The whole scan is one compiled call.

The plot functions need matplotlib (the ``demo`` extra); it is imported inside them, so the rest
of jaxprune never does. They draw on a bare ``matplotlib.figure.Figure`` and write a PNG, leaving
pyplot's global state and backend alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
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

__all__ = [
    "Sensitivity",
    "accuracy",
    "plot_history",
    "plot_sensitivity",
    "plot_weight_histogram",
    "sensitivity",
]

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
      grid_kind: ``'q'`` (Han's quality parameter) or ``'kept_fraction'`` (target fraction kept).
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

        Keys: ``layer``, ``q`` (``None`` for a kept-fraction scan), ``kept_fraction``, ``accuracy``.
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


def _check_grid(qs: Any, kept_fractions: Any) -> tuple[str, np.ndarray]:
    if (qs is None) == (kept_fractions is None):
        raise ValueError(
            "sensitivity needs exactly one of qs= (Han's q values) or kept_fractions= (targets), "
            f"got qs={qs!r}, kept_fractions={kept_fractions!r}."
        )
    kind, values = ("q", qs) if qs is not None else ("kept_fraction", kept_fractions)
    grid = np.asarray(values, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError(f"{kind} grid has shape {grid.shape}, expected a non-empty 1-D sequence.")
    ok = (grid >= 0) & np.isfinite(grid) if kind == "q" else (grid > 0) & (grid <= 1)
    if not ok.all():
        wanted = "finite and >= 0" if kind == "q" else "in (0, 1]"
        name = "qs" if kind == "q" else "kept_fractions"
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
                params, 1.0 - value, scope="layer", where=where, stacked=dict(stacked)
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
    kept_fractions: Sequence[float] | None = None,
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
    ``kept_fractions``). All (layer, value) points run in one jitted call: the layer and value
    are traced, ``grid_batch`` points are vmapped together, and the data are scanned in batches.

    Args:
      apply_fn: ``apply_fn(params, x_batch) -> logits``; must be hashable.
      params: a params tree (Linen dict or NNX state).
      x: evaluation inputs.
      y: integer labels, shape ``(len(x),)``.
      qs: Han's quality parameters to scan (``>= 0``); give this or ``kept_fractions``.
      kept_fractions: fractions of each layer to keep, in ``(0, 1]``.
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
      ValueError: on a bad grid (both or neither given, negative ``q``, fraction outside
        ``(0, 1]``), no prunable layer, mismatched ``x``/``y``, or ``batch_size``/``grid_batch``
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
    kind, grid = _check_grid(qs, kept_fractions)
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


# --- plots ------------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 4.0):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "plots need matplotlib: pip install 'jaxprune[demo]' (or pip install matplotlib)."
        ) from e
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_weight_histogram(
    before: Any,
    after: Any,
    path: str | os.PathLike,
    *,
    title: str = "",
    bins: int = 80,
) -> Path:
    """Writes a PNG of a layer's weight distribution before and after pruning.

    The picture of Han et al. 2015's weight-distribution figure: before, a bell around zero;
    after pruning and retraining, the middle is gone and the survivors form two lobes. Entries of
    ``after`` that are exactly zero are taken as pruned and left out of its histogram.

    Args:
      before: the layer's weights before pruning (any shape).
      after: the same layer after pruning (and retraining), pruned entries zero.
      path: the PNG file to write (parent folders are created).
      title: a figure title, e.g. the layer path.
      bins: histogram bins per panel.

    Returns:
      The path written.

    Raises:
      ValueError: if ``before`` is empty or ``bins < 1``.
      ImportError: if matplotlib is not installed.

    Example:
      >>> import numpy as np, tempfile, os
      >>> w = np.random.default_rng(0).normal(size=(50, 20))
      >>> out = plot_weight_histogram(w, np.where(abs(w) > 1, w, 0), tempfile.mkdtemp() + "/h.png")
      >>> os.path.getsize(out) > 1000
      True
    """
    before = np.asarray(before, np.float64).ravel()
    after = np.asarray(after, np.float64).ravel()
    if before.size == 0:
        raise ValueError("before is empty; pass the layer's weight array.")
    if bins < 1:
        raise ValueError(f"bins is {bins}, expected >= 1.")
    survivors = after[after != 0]
    fig = _figure(9.0, 3.5)
    left, right = fig.subplots(1, 2, sharex=True)
    left.hist(before, bins=bins, color="tab:blue")
    left.set_title(f"before pruning ({before.size:,} weights)")
    right.hist(survivors, bins=bins, color="tab:orange")
    kept = 100 * survivors.size / after.size if after.size else 0.0
    right.set_title(f"after pruning ({survivors.size:,} kept, {kept:.1f}%)")
    for ax in (left, right):
        ax.set_xlabel("weight value")
        ax.set_ylabel("count")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


_HISTORY_KEYS = ("round", "kept_fraction", "accuracy")


def plot_history(
    history: Sequence[Mapping[str, float]], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """Writes a PNG of kept % and accuracy % per pruning round.

    Args:
      history: one mapping per round with keys ``round``, ``kept_fraction`` (in ``[0, 1]``) and
        ``accuracy`` (in ``[0, 1]``); other keys are ignored.
      path: the PNG file to write.
      title: a figure title.

    Returns:
      The path written.

    Raises:
      ValueError: if ``history`` is empty or an entry lacks a key.
      ImportError: if matplotlib is not installed.

    Example:
      >>> import tempfile, os
      >>> h = [{"round": 0, "kept_fraction": 1.0, "accuracy": 0.98},
      ...      {"round": 1, "kept_fraction": 0.3, "accuracy": 0.97}]
      >>> os.path.getsize(plot_history(h, tempfile.mkdtemp() + "/r.png")) > 1000
      True
    """
    if not history:
        raise ValueError("history is empty; pass one dict per round.")
    for i, entry in enumerate(history):
        missing = [k for k in _HISTORY_KEYS if k not in entry]
        if missing:
            raise ValueError(
                f"history[{i}] lacks {missing}; each entry needs keys {list(_HISTORY_KEYS)}."
            )
    rounds = [entry["round"] for entry in history]
    kept = [100 * float(entry["kept_fraction"]) for entry in history]
    acc = [100 * float(entry["accuracy"]) for entry in history]
    fig = _figure()
    ax = fig.subplots()
    ax.plot(rounds, kept, "o-", color="tab:blue", label="kept %")
    ax.xaxis.get_major_locator().set_params(integer=True)  # rounds are whole numbers
    ax.set_xlabel("pruning round")
    ax.set_ylabel("weights kept (%)", color="tab:blue")
    ax.set_ylim(0, 105)
    twin = ax.twinx()
    twin.plot(rounds, acc, "s--", color="tab:red", label="accuracy %")
    twin.set_ylabel("test accuracy (%)", color="tab:red")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_sensitivity(result: Sensitivity, path: str | os.PathLike, *, title: str = "") -> Path:
    """Writes a PNG of accuracy against kept % for each layer (Han et al. 2015, Fig. 6 style).

    Args:
      result: a :class:`Sensitivity` from :func:`sensitivity`.
      path: the PNG file to write.
      title: a figure title.

    Returns:
      The path written.

    Raises:
      TypeError: if ``result`` is not a :class:`Sensitivity`.
      ImportError: if matplotlib is not installed.

    Example:
      >>> import numpy as np, tempfile, os
      >>> s = Sensitivity(("fc1/kernel",), "q", np.array([0.0, 1.0]), np.array([[1.0, 0.4]]),
      ...                 np.array([[0.9, 0.7]]), 0.9)
      >>> os.path.getsize(plot_sensitivity(s, tempfile.mkdtemp() + "/s.png")) > 1000
      True
    """
    if not isinstance(result, Sensitivity):
        raise TypeError(f"result is a {type(result).__name__}, expected a Sensitivity.")
    fig = _figure()
    ax = fig.subplots()
    for i, layer in enumerate(result.layers):
        order = np.argsort(-result.kept_fraction[i], kind="stable")
        ax.plot(
            100 * result.kept_fraction[i][order],
            100 * result.accuracy[i][order],
            "o-",
            label=layer,
        )
    ax.axhline(100 * result.baseline, color="gray", linestyle=":", label="unpruned")
    ax.set_xlabel("weights kept in the layer (%)")
    ax.set_ylabel("accuracy, no retraining (%)")
    # Fig. 6 reads left to right as more is pruned away.
    ax.set_xlim(105, -5)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return _save(fig, path)
