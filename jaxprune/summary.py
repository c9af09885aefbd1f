"""Summaries of masks: how many connections each prunable layer keeps (Han et al.'s Table 2).

Counts are reductions where the masks lie (sharded masks stay sharded); only one scalar per
layer (per slice of a stacked one) comes to the host.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxprune._settle import settled
from jaxprune._text import table
from jaxprune._tree import (
    PyTree,
    Stacked,
    Where,
    check_masks,
    default_where,
    is_array,
    leaves_with_paths,
    slice_name,
    stacked_axes,
)
from jaxprune.nm import default_axis, slice_patterns


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    """One row of :class:`Summary`: a prunable leaf and how much of it is kept."""

    path: str
    shape: tuple[int, ...]
    total: int
    kept: int
    pattern: tuple[int, int] | None = None  # the N:M it satisfies (jaxprune.nm.slice_patterns)

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.total if self.total else 1.0


@dataclasses.dataclass(frozen=True)
class Summary:
    """Per-layer and total counts of kept connections; ``str()`` renders a table."""

    rows: tuple[LayerSummary, ...]

    @property
    def total(self) -> int:
        return sum(r.total for r in self.rows)

    @property
    def kept(self) -> int:
        return sum(r.kept for r in self.rows)

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.total if self.total else 1.0

    def __str__(self) -> str:
        header: tuple[str, ...] = ("layer", "shape", "weights", "kept", "kept %")
        lines: list[tuple[str, ...]] = [
            (
                r.path,
                "x".join(map(str, r.shape)),
                f"{r.total:,}",
                f"{r.kept:,}",
                f"{100 * r.kept_fraction:.2f}%",
            )
            for r in self.rows
        ]
        ratio = f"{self.total / self.kept:.1f}x fewer" if self.kept else "all pruned"
        lines.append(
            (
                "total",
                "",
                f"{self.total:,}",
                f"{self.kept:,}",
                f"{100 * self.kept_fraction:.2f}% ({ratio})",
            )
        )
        if any(r.pattern for r in self.rows):
            header = (*header, "N:M")
            pattern = ["" if r.pattern is None else "{}:{}".format(*r.pattern) for r in self.rows]
            lines = [(*line, p) for line, p in zip(lines, [*pattern, ""], strict=True)]
        return table(header, lines[:-1], lines[-1], left=2)


def summarize(
    params: PyTree, masks: PyTree, *, where: Where | None = None, stacked: Stacked | None = None
) -> Summary:
    """Counts the kept connections of each prunable leaf (Han et al. 2015, Table 2 style).

    Rows cover the leaves that ``where`` selects (default :func:`jaxprune.default_where`) and any
    other array leaf whose mask prunes something; a stacked leaf gets one row per slice, named
    ``'path[i]'``.

    Args:
      params: a pytree of parameters.
      masks: a mask tree matching ``params``.
      where: ``where(path, leaf) -> bool`` choosing the rows; default as in :func:`compute_masks`.
      stacked: ``{pattern: axis}`` for stacked layers, as in :func:`compute_masks`.

    Returns:
      A :class:`Summary`; ``summary.rows``, ``summary.total``, ``summary.kept``, ``str(summary)``.

    Raises:
      ValueError: if ``masks`` does not match ``params``.

    >>> import numpy as np
    >>> s = summarize({'w': np.ones((2, 2))}, {'w': np.array([[True, False], [False, False]])})
    >>> s.kept, s.total, s.rows[0].kept_fraction
    (1, 4, 0.25)
    """
    check_masks(params, masks)
    rule = default_where if where is None else where
    mask_of = dict(leaves_with_paths(masks))
    # Counts are reductions where the masks lie; only scalars (one per slice) come to the host.
    kept_of = jax.device_get(  # one fetch for every leaf's count
        {
            path: settled(jnp.sum(mask_of[path], dtype=jnp.int32), mask_of[path])
            for path, leaf in leaves_with_paths(params)
            if is_array(leaf)
        }
    )
    shown = {
        path: is_array(leaf) and (rule(path, leaf) or int(kept_of[path]) < leaf.size)
        for path, leaf in leaves_with_paths(params)
    }
    axes = stacked_axes(params, stacked, shown)
    rows = []
    for path, leaf in leaves_with_paths(params):
        if not shown[path]:
            continue
        shape, mask = tuple(leaf.shape), mask_of[path]
        axis = axes.get(path)
        if leaf.ndim == 0 or (axis is not None and leaf.ndim == 1):
            patterns: list[tuple[int, int] | None] = [None] * (1 if axis is None else shape[0])
        else:
            n_axis = default_axis(path, leaf.ndim - (axis is not None))
            n_axis += axis is not None and n_axis >= axis
            patterns = slice_patterns(mask, n_axis, axis)
        if axis is None:
            rows.append(LayerSummary(path, shape, int(leaf.size), int(kept_of[path]), patterns[0]))
            continue
        others = tuple(d for d in range(len(shape)) if d != axis)
        kept = jax.device_get(jnp.sum(mask, axis=others, dtype=jnp.int32))
        part = shape[:axis] + shape[axis + 1 :]
        for i, k in enumerate(kept):
            size = leaf.size // shape[axis]
            rows.append(LayerSummary(slice_name(path, i), part, size, int(k), patterns[i]))
    return Summary(tuple(rows))
