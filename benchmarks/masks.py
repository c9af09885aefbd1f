"""Time jitted ``compute_masks`` against a jitted copy of the same parameter tree.

Both run in the same process, interleaved, so the printed ratio is robust to machine drift.
Also prints XLA's memory analysis: the extra bytes per parameter that the masks cost.

Then the scaling table: ``masks_for_sparsity`` (layer and global scope) beside ``compute_masks``
at 1M / 10M / 100M parameters, each figure with the CPU load of other processes while it ran
(from /proc/stat, our own CPU time subtracted).

    python benchmarks/masks.py            # 24 matrices of 2048x2048 (about 100M float32)
    python benchmarks/masks.py --quick    # 4 matrices of 512x512; the table at 65K and 1M
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

import jaxprune


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def _busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def timed_with_load(fn, *args) -> tuple[float, float]:
    """Seconds one call took, and the cores other processes kept busy meanwhile."""
    busy, own, start = _busy_seconds(), _own_seconds(), time.perf_counter()
    jax.block_until_ready(fn(*args))
    wall = time.perf_counter() - start
    others = max((_busy_seconds() - busy) - (_own_seconds() - own), 0.0)
    return wall, others / max(wall, 1e-9)


def tree_of(n_params: int) -> dict:
    side = 1024 if n_params >= 2**20 else 256
    count = max(n_params // (side * side), 1)
    keys = jax.random.split(jax.random.key(1), count)
    return {
        f"layer_{i}": {"kernel": jax.random.normal(k, (side, side))} for i, k in enumerate(keys)
    }


def scaling_table(sizes: list[int], repeats: int) -> None:
    """masks_for_sparsity (layer, global) beside compute_masks, interleaved, per tree size."""
    fns = {
        "compute_masks": lambda p: jaxprune.compute_masks(p, 1.0),
        "sparsity layer": lambda p: jaxprune.masks_for_sparsity(p, 0.9),
        "sparsity global": lambda p: jaxprune.masks_for_sparsity(p, 0.9, scope="global"),
    }
    print("\nscaling (eager calls, median of", repeats, "; load = other processes' cores)")
    print(f"{'params':>8}  " + "  ".join(f"{name:>26}" for name in fns) + "  ratios layer / global")
    for n in sizes:
        params = tree_of(n)
        jax.block_until_ready([f(params) for f in fns.values()])  # compile all
        runs = {name: [] for name in fns}
        for _ in range(repeats):
            for name, f in fns.items():
                runs[name].append(timed_with_load(f, params))
        med = {
            name: (
                statistics.median(t for t, _ in r),
                statistics.median(load for _, load in r),
            )
            for name, r in runs.items()
        }
        cells = [f"{1e3 * t:10.1f} ms (load {load:.2f})" for t, load in med.values()]
        base = med["compute_masks"][0]
        size = sum(x.size for x in jax.tree.leaves(params))
        print(
            f"{size / 1e6:7.1f}M  "
            + "  ".join(f"{c:>26}" for c in cells)
            + f"  {med['sparsity layer'][0] / base:.1f}x / {med['sparsity global'][0] / base:.1f}x"
        )
        del params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small tree, for a smoke run")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    count, side = (4, 512) if args.quick else (24, 2048)

    keys = jax.random.split(jax.random.key(0), count)
    params = {
        f"layer_{i}": {"kernel": jax.random.normal(k, (side, side))} for i, k in enumerate(keys)
    }
    n_params = count * side * side

    masks_fn = jax.jit(jaxprune.compute_masks)
    copy_fn = jax.jit(lambda p: jax.tree.map(lambda x: x + 0, p))
    q = jnp.float32(1.0)
    jax.block_until_ready((masks_fn(params, q), copy_fn(params)))  # compile both

    mask_times, copy_times = [], []
    for _ in range(args.repeats):
        mask_times.append(timed(masks_fn, params, q))
        copy_times.append(timed(copy_fn, params))
    t_mask, t_copy = statistics.median(mask_times), statistics.median(copy_times)

    mem = masks_fn.lower(params, q).compile().memory_analysis()
    extra = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / n_params if mem else float("nan")
    kept = jaxprune.summarize(params, masks_fn(params, q)).kept_fraction

    print(f"tree: {count} x {side}x{side} float32 = {n_params / 1e6:.1f}M parameters")
    print(f"compute_masks (jit), median of {args.repeats}: {1e3 * t_mask:8.2f} ms")
    print(f"copy x + 0   (jit), median of {args.repeats}: {1e3 * t_copy:8.2f} ms")
    print(f"ratio masks / copy: {t_mask / t_copy:.2f}  (target <= 0.70)")
    print(f"extra memory (masks output + XLA temporaries): {extra:.2f} bytes per parameter")
    print(f"kept at q=1: {100 * kept:.1f}% (a Gaussian keeps about 31.7%)")
    del params
    if args.quick:
        scaling_table([2**16, 2**20], repeats=3)
    else:
        scaling_table([2**20, 10 * 2**20, 96 * 2**20], repeats=3)


if __name__ == "__main__":
    main()
