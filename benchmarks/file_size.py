"""Bytes on disk of pruned LeNets: dense .npz, BCOO with int32 indices, and jaxprune.storage files.

Weights are random (no training): magnitude-pruned per layer (``jaxprune.masks_for_sparsity``) to
the kept fractions Han et al. 2015 report (Table 2 for LeNet-300-100, Table 3 for LeNet-5), and
exported by ``jaxprune.to_bcoo``. Two weight distributions: uniform ("random magnitudes") and
Gaussian with std sqrt(2 / fan_in) (closer to trained weights). Ratios are dense .npz bytes / file
bytes, so higher is better.

Then the save time at scale: ``save`` with its default compression against ``compress=False``
(the raw write) on square 2048x2048 Gaussian layers pruned to 10% kept, 4M / 25M / 100M weights,
best of two saves each, with the others' load beside each row (``measure.Load``). Measured here
(jax 0.10.2, 2 cores, others 0.00-0.05), two runs: 2.11x / 1.97x / 2.08x and 2.04x / 2.12x /
2.14x the raw write's time for files
0.751 of the raw file's bytes; before large planes took fast deflate only, 14.2x / 14.6x / 14.3x
for 0.719.

Usage: python benchmarks/file_size.py [--quick] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from measure import Load

import jaxprune
from jaxprune.storage import load, save

# (name, kernel shape, kept fraction); biases have the kernel's last dimension.
LENET_300_100 = [("fc1", (784, 300), 0.08), ("fc2", (300, 100), 0.09), ("fc3", (100, 10), 0.26)]
LENET_5 = [
    ("conv1", (5, 5, 1, 20), 0.66),
    ("conv2", (5, 5, 20, 50), 0.12),
    ("fc1", (800, 500), 0.08),
    ("fc2", (500, 10), 0.19),
]


def make_weights(layers, distribution: str, rng: np.random.Generator) -> dict:
    params = {}
    for name, shape, _ in layers:
        fan_in = int(np.prod(shape[:-1]))
        if distribution == "uniform":
            kernel = rng.uniform(-1.0, 1.0, shape)
        else:
            kernel = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        bias = rng.normal(0.0, 0.01, shape[-1])
        params[name] = {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}
    return params


def prune(params: dict, layers) -> tuple[dict, dict]:
    """Masks keeping the largest-magnitude fraction of each kernel, and the params they prune."""
    masks = jaxprune.masks_for_sparsity(params, {name: 1.0 - kept for name, _, kept in layers})
    return masks, jaxprune.apply_masks(params, masks)


def npz_bytes(directory: str, name: str, arrays: dict) -> int:
    path = os.path.join(directory, name + ".npz")
    np.savez(path, **arrays)
    return os.path.getsize(path)


def report(model: str, layers, distribution: str, *, quick: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    params = make_weights(layers, distribution, rng)
    masks, pruned = prune(params, layers)
    sparse = jaxprune.to_bcoo(params, masks)
    with tempfile.TemporaryDirectory() as d:
        dense = npz_bytes(
            d, "dense", {f"{n}_{k}": v for n, layer in pruned.items() for k, v in layer.items()}
        )
        bcoo_arrays = {}
        for name, layer in sparse.items():
            bcoo_arrays[f"{name}_data"] = np.asarray(layer["kernel"].data)
            bcoo_arrays[f"{name}_indices"] = np.asarray(layer["kernel"].indices)
            bcoo_arrays[f"{name}_bias"] = layer["bias"]
        rows = [
            ("dense float32 .npz", dense, "", 0.0),
            ("BCOO int32 .npz", npz_bytes(d, "bcoo", bcoo_arrays), "", 0.0),
        ]

        def ours(label: str, **options) -> None:
            path = os.path.join(d, "model.jxp")
            r = save(path, sparse, **options)
            loaded = jaxprune.to_dense(load(path))
            for name in sparse:  # check the file really holds the model
                got = np.asarray(loaded[name]["kernel"])
                want = pruned[name]["kernel"]
                error = float(np.max(np.abs(got - want)))
                assert error <= r.max_abs_error, (label, name, error, r.max_abs_error)
            encodings = ",".join(x.index_encoding for x in r.leaves if x.kind == "bcoo")
            rows.append((label, r.nbytes, encodings, r.max_abs_error))

        ours("jaxprune auto (exact)")
        if not quick:
            ours("jaxprune bitmask, raw", index="bitmask", compress=False)
            ours("jaxprune delta, raw", index="delta", compress=False)
            ours("jaxprune bitmask, compressed", index="bitmask")
            ours("jaxprune delta, compressed", index="delta")
            ours("jaxprune float16", values="float16")
            ours("jaxprune shared 8-bit", values="shared", bits=8)
        ours("jaxprune shared 5-bit", values="shared", bits=5)

    kept = sum(int(np.sum(masks[name]["kernel"])) for name, _, _ in layers)
    total = sum(int(np.prod(s)) for _, s, _ in layers)
    print(f"\n{model}, {distribution} weights, {kept}/{total} weights kept ({kept / total:.1%})")
    print(f"{'file':<30} {'bytes':>9} {'dense/file':>10} {'max abs error':>14}  index per layer")
    for label, nbytes, encodings, error in rows:
        print(f"{label:<30} {nbytes:>9} {dense / nbytes:>9.2f}x {error:>14.3g}  {encodings}")


def save_speed(layer_counts: list[int]) -> None:
    """Default save against the raw write, per model size, best of two each."""
    print(
        f"\n{'weights':>8} {'save s':>7} {'raw s':>6} {'time ratio':>10} {'bytes ratio':>11} others"
    )
    for count in layer_counts:
        rng = np.random.default_rng(0)
        params = {
            f"l{i}": {"kernel": (rng.standard_normal((2048, 2048)) * 0.03).astype(np.float32)}
            for i in range(count)
        }
        sparse = jaxprune.to_bcoo(params, jaxprune.masks_for_sparsity(params, 0.9))
        best: dict[str, tuple[float, int]] = {}
        with tempfile.TemporaryDirectory() as d, Load() as load:
            for label, options in [("raw", {"compress": False}), ("default", {})] * 2:
                start = time.perf_counter()
                nbytes = save(os.path.join(d, label), sparse, **options).nbytes
                seconds = time.perf_counter() - start
                best[label] = min(best.get(label, (seconds, nbytes)), (seconds, nbytes))
        (t_default, b_default), (t_raw, b_raw) = best["default"], best["raw"]
        print(
            f"{count * 4.19:7.0f}M {t_default:7.2f} {t_raw:6.2f} {t_default / t_raw:9.2f}x "
            f"{b_default / b_raw:11.3f} {load.cores:6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="LeNet-300-100, Gaussian, 2 files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    models = [("LeNet-300-100", LENET_300_100)]
    distributions = ["gaussian"]
    if not args.quick:
        models.append(("LeNet-5", LENET_5))
        distributions.insert(0, "uniform")
    for model, layers in models:
        for distribution in distributions:
            report(model, layers, distribution, quick=args.quick, seed=args.seed)
    save_speed([1] if args.quick else [1, 6, 24])


if __name__ == "__main__":
    main()
