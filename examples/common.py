"""What the examples share: shuffled batches, the machine's load, mean +- std cells."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np


def batches(data, seed: int, size: int = 64) -> Iterator[tuple[jnp.ndarray, jnp.ndarray]]:
    """One epoch of shuffled training batches (the last partial batch is dropped)."""
    order = np.random.default_rng(seed).permutation(len(data.x_train))
    for i in range(0, len(order) - size + 1, size):
        idx = order[i : i + size]
        yield jnp.asarray(data.x_train[idx]), jnp.asarray(data.y_train[idx])


def _busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class Load:
    """What other processes kept busy while the block ran, in cores (ours subtracted)."""

    def __enter__(self) -> Load:
        self._start = (_busy_seconds(), _own_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = (
            b - a
            for a, b in zip(
                self._start, (_busy_seconds(), _own_seconds(), time.perf_counter()), strict=True
            )
        )
        self.cores = max(busy - own, 0.0) / max(wall, 1e-9)


def fmt_spread(values) -> str:
    """``mean +- std`` in percent (just the mean for one value)."""
    if not values:
        return ""
    mean = 100 * float(np.mean(values))
    return (
        f"{mean:.1f}%" if len(values) == 1 else f"{mean:.1f} ± {100 * float(np.std(values)):.1f}%"
    )
