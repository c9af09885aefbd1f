"""Minibatches drawn on the device from a data set held there, so an epoch runs as one call.

On a small model the host's part of each training step (slicing a NumPy batch, copying it to the
device, dispatching the step) is a large part of the step, and on a CPU it takes cores the step
itself needs. An :class:`ArrayBatches` keeps the data set as device arrays and draws each epoch's
minibatches from a permutation of its examples: ``step.epoch`` of
:func:`jaxprune.make_retrain_step` runs a whole epoch as one compiled loop, and
:func:`jaxprune.prune_and_retrain` does so when its ``batches`` is an ``ArrayBatches``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._tree import PyTree, is_array, leaves_with_paths


@functools.partial(jax.jit, static_argnames=("size", "batch_size"))
def epoch_rows(key: jax.Array, epoch: jax.Array, *, size: int, batch_size: int) -> jax.Array:
    """The example indices of one epoch's minibatches: ``(size // batch_size, batch_size)``.

    A permutation of ``range(size)`` drawn from ``fold_in(key, epoch)``, cut into rows; the last
    ``size % batch_size`` examples of the permutation (others each epoch) are left out, so every
    batch has the same shape and the epoch compiles once.
    """
    steps = size // batch_size
    order = jax.random.permutation(jax.random.fold_in(key, epoch), size)
    return order[: steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)


def take(data: PyTree, rows: jax.Array) -> PyTree:
    """The examples at ``rows`` (any int array shape) of every leaf of ``data``, along axis 0."""
    return jax.tree.map(lambda a: jnp.take(a, rows, axis=0), data)


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayBatches:
    """A data set on the device and a minibatch size: ``batches(epoch)`` yields one epoch.

    Epoch ``e`` is a permutation of the examples drawn from ``fold_in(key, e)`` (``key`` from
    ``seed``), cut into ``steps`` batches of ``batch_size``; the ``size % batch_size`` examples
    left over (different ones each epoch) are dropped, so every batch has one shape. Iterating
    ``batches(e)`` gathers one batch per call, for any loop that takes an iterable of batches;
    ``step.epoch(state, batches, e)`` (:func:`jaxprune.make_retrain_step`) runs the same batches
    as one compiled loop, and :func:`jaxprune.prune_and_retrain` does that for each epoch.

    Args:
      data: a pytree of arrays sharing their first dimension, the examples (e.g. ``(x, y)``).
        NumPy leaves are copied to JAX's default device once, here; JAX arrays stay where they
        are (keep them on one device: a gather from a data set split over devices moves it).
        The caller's arrays are not modified.
      batch_size: examples per batch, ``1 <= batch_size <= size``.
      seed: an int seed or a PRNG key (any ``impl``) for the shuffles.

    Raises:
      ValueError: on a ``batch_size`` that is not an int in ``[1, size]``, no leaf in ``data``,
        a leaf without a first dimension, or leaves whose first dimensions differ (the leaf is
        named by its path).
      TypeError: on a leaf that is not an array.

    >>> import numpy as np
    >>> batches = ArrayBatches((np.arange(10.0), np.arange(10) % 2), batch_size=4, seed=0)
    >>> batches.steps, [x.shape for x, y in batches(0)]
    (2, [(4,), (4,)])
    >>> [sorted(x.tolist()) for x, _ in batches(0)] == [sorted(x.tolist()) for x, _ in batches(0)]
    True
    """

    data: PyTree
    batch_size: int
    seed: int | jax.Array = 0
    key: jax.Array = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        leaves = leaves_with_paths(self.data)
        if not leaves:
            raise ValueError("ArrayBatches: data holds no array; pass e.g. (x, y).")
        first_path, first = leaves[0]
        for path, leaf in leaves:
            if not is_array(leaf):
                raise TypeError(
                    f"ArrayBatches: data[{path!r}] is of type {type(leaf).__name__}, expected an array "
                    "with the examples along its first axis."
                )
            if np.ndim(leaf) == 0:
                raise ValueError(
                    f"ArrayBatches: data[{path!r}] is a scalar; every leaf needs the examples "
                    "along its first axis."
                )
            if leaf.shape[0] != first.shape[0]:
                raise ValueError(
                    f"ArrayBatches: data[{path!r}] has {leaf.shape[0]} examples but "
                    f"data[{first_path!r}] has {first.shape[0]}; every leaf's first dimension "
                    "must be the same."
                )
        size = first.shape[0]
        bs = self.batch_size
        if isinstance(bs, bool) or not isinstance(bs, (int, np.integer)) or not 1 <= bs <= size:
            raise ValueError(
                f"ArrayBatches: batch_size is {bs!r}, expected an int in [1, {size}] (the data "
                f"has {size} examples)."
            )
        placed = jax.tree.map(
            lambda a: a if isinstance(a, jax.Array) else jnp.asarray(a), self.data
        )
        seed = self.seed
        key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
        object.__setattr__(self, "data", placed)
        object.__setattr__(self, "batch_size", int(bs))
        object.__setattr__(self, "key", key)

    @property
    def size(self) -> int:
        """The number of examples."""
        return int(jax.tree.leaves(self.data)[0].shape[0])

    @property
    def steps(self) -> int:
        """Batches per epoch: ``size // batch_size``."""
        return self.size // self.batch_size

    def rows(self, epoch: int | jax.Array) -> jax.Array:
        """Epoch ``epoch``'s example indices, one row per batch (see :func:`epoch_rows`)."""
        return epoch_rows(
            self.key, jnp.asarray(epoch, jnp.int32), size=self.size, batch_size=self.batch_size
        )

    def __call__(self, epoch: int) -> Iterator[Any]:
        """Yields epoch ``epoch``'s batches, each a pytree like ``data`` with ``batch_size`` rows."""
        for row in self.rows(epoch):
            yield take(self.data, row)
