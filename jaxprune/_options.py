"""Per-layer options: a scalar, or a mapping from leaf/layer paths and patterns to scalars.

``compute_masks``'s ``q`` and ``masks_for_sparsity``'s ``sparsity`` are resolved here to one
value per layer (a leaf, or one slice of a stacked leaf), with their scalar checks.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._tree import Unit

QSpec = Any  # a scalar (possibly traced) or a mapping from path / path pattern to a scalar


def is_traced(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_scalar(value: Any, *, name: str, low: float, high: float, closed_high: bool) -> None:
    """Validates a concrete scalar option eagerly; traced values are taken as given."""
    if is_traced(value):
        if jnp.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got a traced array of shape {value.shape}.")
        return
    if isinstance(value, bool) or not isinstance(
        value, (int, float, np.number, np.ndarray, jax.Array)
    ):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}.")
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got an array of shape {np.shape(value)}.")
    v = float(value)
    inside = low <= v and (v <= high if closed_high else v < high)
    if not inside:
        bound = f"[{low}, {high}]" if closed_high else f"[{low}, {high})"
        raise ValueError(f"{name} must be finite and in {bound}, got {value!r}.")


def check_count(value: Any, *, name: str, low: int = 1) -> int:
    """An int option ``>= low``: a ``TypeError`` for another type (bools too), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}.")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    return int(value)


def layer_of(path: str) -> str:
    """The layer a leaf belongs to: its path minus the last key, as ``compute_masks`` names layers.

    >>> layer_of("fc1/kernel"), layer_of("layers/0/kernel"), layer_of("kernel")
    ('fc1', 'layers/0', 'kernel')
    """
    return path.rsplit("/", 1)[0] if "/" in path else path


def per_unit(
    q: QSpec, units: list[Unit], *, name: str, high: float, closed_high: bool
) -> dict[Unit, Any]:
    """Resolves ``q`` (or a sparsity) to one value per layer; units a mapping omits are skipped.

    A mapping key names a slice of a stacked leaf (``'layers/Dense_0/kernel[3]'``), a leaf path
    (``'Dense_0/kernel'``), a layer path (``'Dense_0'``), or an ``fnmatch`` pattern over any of
    them (``'Conv_*'``). An exact name wins over a pattern (the most specific exact name first);
    two patterns that both match one unit are ambiguous and rejected.
    """
    if not isinstance(q, Mapping):
        check_scalar(q, name=name, low=0.0, high=high, closed_high=closed_high)
        return dict.fromkeys(units, q)
    for key, value in q.items():
        check_scalar(value, name=f"{name}[{key!r}]", low=0.0, high=high, closed_high=closed_high)
    resolved: dict[Unit, Any] = {}
    used: set[str] = set()
    for unit in units:
        names = (unit.name, unit.path, layer_of(unit.path))
        exact = [n for n in names if n in q]
        if exact:
            key = exact[0]
        else:
            globs = [k for k in q if any(fnmatch.fnmatchcase(n, k) for n in names)]
            if len(globs) > 1:
                raise ValueError(
                    f"{name} has several patterns {globs} matching {unit.name!r}; name the leaf "
                    f"or layer exactly to say which {name} applies."
                )
            if not globs:
                continue
            key = globs[0]
        resolved[unit] = q[key]
        used.add(key)
    unused = [k for k in q if k not in used]
    if unused:
        shown = [u.name for u in units]
        raise ValueError(
            f"{name} names {unused}, which match no prunable leaf or layer; prunable layers are "
            f"{shown[:12]}{' ...' if len(shown) > 12 else ''}."
        )
    return resolved


def per_slice(
    values: Mapping[int | None, Any], n: int, axis: int, ndim: int, fill: float
) -> jax.Array:
    """Stacks per-slice scalars into an array that broadcasts along ``axis`` of an ndim array."""
    column = jnp.stack([jnp.asarray(values.get(i, fill), jnp.float32) for i in range(n)])
    shape = [1] * ndim
    shape[axis] = n
    return column.reshape(shape)
