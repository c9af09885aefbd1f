"""What the examples share: shuffled batches; the machine's load and mean ± std cells come from
``benchmarks/measure.py``, which the benchmarks use too."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np

_BENCHMARKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
if _BENCHMARKS not in sys.path:
    sys.path.append(_BENCHMARKS)
from measure import Load, mean_std  # noqa: E402

__all__ = ["Load", "batches", "mean_std"]


def batches(data, seed: int, size: int = 64) -> Iterator[tuple[jnp.ndarray, jnp.ndarray]]:
    """One epoch of shuffled training batches (the last partial batch is dropped)."""
    order = np.random.default_rng(seed).permutation(len(data.x_train))
    for i in range(0, len(order) - size + 1, size):
        idx = order[i : i + size]
        yield jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])
