"""Time jitted ``compute_masks`` against a jitted copy of the same parameter tree.

Both run in the same process, interleaved, so the printed ratio is robust to machine drift.
Also prints XLA's memory analysis: the extra bytes per parameter that the masks cost.

    python benchmarks/masks.py            # 24 matrices of 2048x2048 (about 100M float32)
    python benchmarks/masks.py --quick    # 4 matrices of 512x512
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import jaxprune


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


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


if __name__ == "__main__":
    main()
