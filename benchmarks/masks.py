"""Time jitted ``compute_masks`` against a jitted copy of the same parameter tree.

Both run in the same process, interleaved (``measure.interleaved_medians``), so the printed ratio
is robust to machine drift; beside it, the cores other processes kept busy meanwhile
(``measure.Load``: /proc/stat, our own CPU time subtracted). Also prints XLA's memory analysis:
the masks plus XLA's temporaries per parameter, under jit.

Then the scaling table: ``masks_for_sparsity`` (layer and global scope) beside ``compute_masks``
at 1M / 10M / 100M parameters, each row with the others' load while it ran (one figure per row:
/proc/stat counts in 10 ms ticks, too coarse for one call of the small trees); once on one
device, once in a child process with two CPU devices and every kernel split by rows. At the
smallest and largest tree, the memory of the eager calls' rankings, compiled as they run.

Three quiet runs on 2026-12-08 (2 shared cores, AMD EPYC, others' load 0.00-0.03 cores), at
100.7M, ratio to ``compute_masks``: one device 1.6x / 1.5x / 1.5x (layer) and 1.7x / 1.7x /
1.5x (global); split over 2 devices 1.7x / 1.6x / 2.0x (layer) and 1.0x / 1.0x / 1.2x
(global). Masks plus temporaries under jit: 1.05 (layer) and 1.02 (global) bytes per
parameter, ``compute_masks`` 1.00. Eager, split: 1.002 and 1.031 per local parameter for the
96-layer tree; a tree of one 2**20 layer, 1.22 (the pieces of the layer's candidate blocks
that a split layer sends to every device).
The issue's history of these figures (from 5.7x / 16.3x before the sampled start) is in the
README.

    python benchmarks/masks.py            # 24 matrices of 2048x2048 (about 100M float32)
    python benchmarks/masks.py --quick    # 4 matrices of 512x512; the table at 65K and 1M
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from measure import Load, interleaved_medians

import jaxprune


def tree_of(n_params: int, sharded: bool = False) -> dict:
    side = 1024 if n_params >= 2**20 else 256
    count = max(n_params // (side * side), 1)
    keys = jax.random.split(jax.random.key(1), count)
    place = lambda x: x  # noqa: E731
    if sharded:  # every kernel split by rows over all devices, as FSDP does
        mesh = jax.sharding.Mesh(jax.devices(), ("fsdp",))
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
        place = functools.partial(jax.device_put, device=rows)
    return {
        f"layer_{i}": {"kernel": place(jax.random.normal(k, (side, side)))}
        for i, k in enumerate(keys)
    }


def scaling_table(sizes: list[int], repeats: int, sharded: bool = False) -> None:
    """masks_for_sparsity (layer, global) beside compute_masks, interleaved, per tree size."""
    fns = {
        "compute_masks": lambda p: jaxprune.compute_masks(p, 1.0),
        "sparsity layer": lambda p: jaxprune.masks_for_sparsity(p, 0.9),
        "sparsity global": lambda p: jaxprune.masks_for_sparsity(p, 0.9, scope="global"),
    }
    where = f"kernels split over {jax.device_count()} CPU devices" if sharded else "one device"
    print(f"\nscaling, {where} (eager calls, median of {repeats}, interleaved)")
    print(
        f"{'params':>8}  "
        + "  ".join(f"{name:>15}" for name in fns)
        + "  ratios layer / global  others' load"
    )
    for n in sizes:
        params = tree_of(n, sharded)
        with Load() as load:
            med = interleaved_medians(
                {name: functools.partial(f, params) for name, f in fns.items()},
                repeats,
                budget_s=0.0,
            )
        base = med["compute_masks"]
        size = sum(x.size for x in jax.tree.leaves(params))
        print(
            f"{size / 1e6:7.1f}M  "
            + "  ".join(f"{1e3 * t:12.1f} ms" for t in med.values())
            + f"  {med['sparsity layer'] / base:13.1f}x / {med['sparsity global'] / base:.1f}x"
            + f"  {load.cores:7.2f} cores"
        )
        if n in (sizes[0], sizes[-1]):  # one layer, and the most
            layer, global_ = eager_memory(params)
            print(
                f"  eager calls at {size / 1e6:.1f}M, masks plus XLA's temporaries per local "
                f"parameter: layer {layer:.3f}, global {global_:.3f} (compute_masks: 1.000)"
            )
        del params


def eager_memory(params: dict) -> tuple[float, float]:
    """Masks plus XLA's temporaries per (local) parameter, for the rankings of an eager call.

    ``masks_for_sparsity`` ranks each layer in a call of its own (layer scope) or every layer in
    one (global); compiled as it compiles them (``jaxprune._ranking.compiled``, for the leaves'
    placements), each call's temporaries come from XLA's memory analysis. Layer scope: every
    mask plus the largest one call's temporaries (the layers here are alike).
    """
    from jaxprune._blocks import placements_of
    from jaxprune._ranking import compiled

    leaves = tuple(jax.tree.leaves(params))
    placements = placements_of(leaves)
    shards = jax.device_count() if placements and placements[0] is not None else 1
    local = sum(x.size for x in leaves) // shards

    def analysed(group: tuple, places: tuple) -> tuple[int, int]:
        none = (None,) * len(group)
        args = (group, none, none, jnp.int32(0.9 * sum(x.size for x in group)), places, True)
        mem = compiled(places).lower(*args).compile().memory_analysis()
        return mem.temp_size_in_bytes, mem.output_size_in_bytes

    temp, out = analysed(leaves[:1], placements[:1])
    layer = (temp + out * len(leaves)) / local
    temp, out = analysed(leaves, placements)
    return layer, (temp + out) / local


def sizes_for(quick: bool) -> list[int]:
    return [2**16, 2**20] if quick else [2**20, 10 * 2**20, 96 * 2**20]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small tree, for a smoke run")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sharded-table", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sharded_table:  # the child below: XLA_FLAGS gave it two CPU devices
        scaling_table(sizes_for(args.quick), repeats=5, sharded=True)
        return
    count, side = (4, 512) if args.quick else (24, 2048)

    keys = jax.random.split(jax.random.key(0), count)
    params = {
        f"layer_{i}": {"kernel": jax.random.normal(k, (side, side))} for i, k in enumerate(keys)
    }
    n_params = count * side * side

    masks_fn = jax.jit(jaxprune.compute_masks)
    copy_fn = jax.jit(lambda p: jax.tree.map(lambda x: x + 0, p))
    q = jnp.float32(1.0)
    with Load() as load:
        med = interleaved_medians(
            {
                "masks": functools.partial(masks_fn, params, q),
                "copy": functools.partial(copy_fn, params),
            },
            args.repeats,
            budget_s=0.0,  # exactly --repeats rounds
        )
    t_mask, t_copy = med["masks"], med["copy"]

    mem = masks_fn.lower(params, q).compile().memory_analysis()
    extra = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / n_params if mem else float("nan")
    kept = jaxprune.summarize(params, masks_fn(params, q)).kept_fraction

    print(f"tree: {count} x {side}x{side} float32 = {n_params / 1e6:.1f}M parameters")
    print(f"compute_masks (jit), median of {args.repeats}: {1e3 * t_mask:8.2f} ms")
    print(f"copy x + 0   (jit), median of {args.repeats}: {1e3 * t_copy:8.2f} ms")
    print(
        f"ratio masks / copy: {t_mask / t_copy:.2f}  (target <= 0.70; others' load "
        f"{load.cores:.2f} cores)"
    )
    print(f"extra memory (masks output + XLA temporaries): {extra:.2f} bytes per parameter")
    for scope in ("layer", "global"):
        fn = jax.jit(functools.partial(jaxprune.masks_for_sparsity, scope=scope))
        mem = fn.lower(params, 0.9).compile().memory_analysis()
        extra = (mem.temp_size_in_bytes + mem.output_size_in_bytes) / n_params
        print(f"  masks_for_sparsity (jit, {scope} scope): {extra:.2f} bytes per parameter")
    print(f"kept at q=1: {100 * kept:.1f}% (a Gaussian keeps about 31.7%)")
    del params
    scaling_table(sizes_for(args.quick), repeats=5)
    # Sharded: a child process, since the device count is fixed when JAX starts.
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    child = [sys.executable, __file__, "--sharded-table"] + (["--quick"] if args.quick else [])
    subprocess.run(child, env={**os.environ, "XLA_FLAGS": flags}, check=True)


if __name__ == "__main__":
    main()
