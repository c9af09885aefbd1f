"""What the benchmarks and examples share: the machine's load, interleaved timing, mean ± std.

Absolute times drift on a shared machine, so every benchmark prints ratios measured side by side,
and beside each the load other processes put on the cores meanwhile (``Load``): /proc/stat busy
time of all cores minus this process's own CPU time, in cores.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np


def _busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot, from /proc/stat (NaN where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return math.nan
    # user nice system idle iowait ...: everything but idle and iowait is busy
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds of this process (all its threads) and of its children it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Load:
    """Cores other processes kept busy while the block ran (``.cores``; ours subtracted).

    ``.cores`` is NaN where /proc/stat cannot be read (not Linux). /proc/stat counts in clock
    ticks (usually 10 ms), so wrap a block of a second or more, not a single short call.

    >>> with Load() as load:
    ...     pass
    >>> load.cores >= 0 or math.isnan(load.cores)
    True
    """

    cores: float = math.nan

    def __enter__(self) -> Load:
        self._start = (_busy_seconds(), _own_seconds(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        end = (_busy_seconds(), _own_seconds(), time.perf_counter())
        busy, own, wall = (b - a for a, b in zip(self._start, end, strict=True))
        self.cores = math.nan if math.isnan(busy) else max(busy - own, 0.0) / max(wall, 1e-9)


def timed(fn: Callable, *args) -> float:
    """Seconds one call takes, its result waited for."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, budget_s: float
) -> dict[str, float]:
    """Median seconds per call of each callable, timed round by round in a shuffled order.

    After a warm-up call each, runs at least ``repeats`` rounds, more (up to 300) while they fit
    in ``budget_s``: fast cases get many rounds, which is what tames a shared machine's noise.
    """
    for fn in fns.values():  # compile and fill caches
        jax.block_until_ready(fn())
    per_round = sum(timed(fn) for fn in fns.values())
    rounds = int(min(300, max(repeats, budget_s / max(per_round, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)  # no callable always runs first (or right after scipy's threads)
        for name in order:
            times[name].append(timed(fns[name]))
    return {name: float(np.median(t)) for name, t in times.items()}


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` of fractions, in percent (just the mean for one value)."""
    if not values:
        return ""
    mean = 100 * float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.1f}%"
    return f"{mean:.1f} ± {100 * float(np.std(values)):.1f}%"
