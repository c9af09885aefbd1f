"""Sparse inference speed against dense jit, per weight layout, measured side by side.

For LeNet-300-100 (``jaxprune.demo.models.LeNet300100``: 784-300-100-10, ReLU, fed 28x28x1
images it flattens) and a single 4096x4096 Dense layer, pruned to each density
(same fraction kept in every layer, smallest magnitudes pruned) and run at each batch size, prints
the time of ``jaxprune.sparse.sparse_apply`` with every layout forced (``bcoo``, ``bcsr``, ``ell``)
and with the automatic choice (``auto``), and of scipy's CSR (one thread, outside reference), each
divided by the time of the dense model under ``jax.jit`` (lower is better; < 1 is faster than
dense). Timings are interleaved round by round and the median is taken
(``measure.interleaved_medians``), since absolute times drift on a shared machine; ``others`` is
the cores other processes kept busy during that row (``measure.Load``). A second table gives the
bytes each layout holds against the dense weights, and ``limit``: the kept weights plus one index
each (int16 where the input size allows it, as the gather layout stores), about the least any
sparse layout can hold and move.

Run ``python benchmarks/sparse_inference.py`` (about 5 minutes on 2 busy cores) or with
``--quick`` (under a minute, mostly compilation). ``-`` marks a layout skipped because its
temporary would need gigabytes.

Measured on the 2-core CPU these thresholds in ``jaxprune._layouts`` come from (jax 0.10.2, other
jobs sharing the cores; two programs that both run dense differed by up to +-25% at batch 1024):

=====================  ========  =====  =====  =====  =====  =====
case, 8% kept          batch     bcoo   bcsr   ell    auto   scipy
=====================  ========  =====  =====  =====  =====  =====
LeNet-300-100          1         1.12   0.82   0.99   0.82   0.54
LeNet-300-100          64        1.69   0.59   2.13   0.62   0.77
LeNet-300-100          1024      6.89   0.68   10.8   0.87   1.21
Dense 4096x4096        1         1.33   0.89   0.44   0.43   0.27
Dense 4096x4096        64        5.43   0.39   6.62   0.40   1.04
Dense 4096x4096        1024      skip   1.32   skip   1.06   1.89
=====================  ========  =====  =====  =====  =====  =====

At batch 1024 ``auto`` runs dense (same program as the reference), so its ratio there is noise.
This table predates the ``others`` column, and was measured with the benchmark's own copy of
LeNet-300-100 (same layers, ``nn.relu``, flat 784-wide inputs); the demo model it now uses adds
only a reshape of the input, so its ratios should compare, but that has not been re-measured.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from measure import Load, interleaved_medians

from jaxprune.demo.models import LeNet300100
from jaxprune.masks import apply_masks, masks_for_sparsity
from jaxprune.sparse import sparse_apply, to_bcoo

LAYOUTS = ("bcoo", "bcsr", "ell", "auto")
TEMP_LIMIT = 2**27  # elements of a gather temporary above which a layout is skipped


class Square(nn.Module):
    """One wide layer, where memory traffic dominates."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.features, use_bias=False)(x)


def _scipy_forward(model_name: str, params: dict) -> Callable[[np.ndarray], np.ndarray]:
    """The same network on scipy CSR matrices of W.T (rows = outputs), numpy elsewhere."""
    layers = [
        (sp.csr_matrix(np.asarray(p["kernel"]).T), np.asarray(p["bias"]) if "bias" in p else None)
        for _, p in sorted(params.items())
    ]

    def forward(x: np.ndarray) -> np.ndarray:
        h = x.reshape(x.shape[0], -1).T
        for i, (wt, b) in enumerate(layers):
            h = wt @ h
            if b is not None:
                h = h + b[:, None]
            if i < len(layers) - 1 and model_name == "lenet":
                h = np.maximum(h, 0)
        return h.T

    return forward


def _skipped(layout: str, x: jax.Array, kernels: dict) -> bool:
    """Whether a forced layout's temporary (kept x rows for bcoo, N x width x rows for ell) is huge."""
    if layout not in ("bcoo", "ell"):
        return False
    rows = x.shape[0]
    worst = 0
    for leaf in kernels.values():
        if layout == "bcoo":
            worst = max(worst, leaf.nse * rows)
        else:
            counts = np.bincount(np.asarray(leaf.indices[:, -1]), minlength=leaf.shape[-1])
            worst = max(worst, leaf.shape[-1] * int(counts.max()) * rows)
    return worst > TEMP_LIMIT


def run_case(
    name: str,
    model: nn.Module,
    in_shape: tuple[int, ...],
    densities,
    batches,
    repeats: int,
    budget: float,
) -> None:
    params = model.init(jax.random.key(0), jnp.ones((1, *in_shape)))["params"]
    print(f"\n== {name}: time / dense jit (lower is better); 'auto' plan in brackets ==")
    header = f"{'density':>7} {'batch':>5} {'dense us':>9}"
    header += "".join(f"{lay:>8}" for lay in LAYOUTS) + f"{'scipy':>8} {'others':>6}  auto plan"
    print(header)
    byte_rows = []
    for density in densities:
        masks = masks_for_sparsity(params, 1.0 - density)
        masked = apply_masks(params, masks)
        exported = to_bcoo(params, masks)
        kernels = {
            path: leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(
                exported, is_leaf=lambda v: hasattr(v, "nse")
            )[0]
            if hasattr(leaf, "nse")
        }
        dense_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
        applies = {lay: sparse_apply(model, exported, formats=lay) for lay in LAYOUTS}
        scipy_fn = _scipy_forward("lenet" if "LeNet" in name else "square", masked)
        for batch in batches:
            x = jax.random.normal(jax.random.key(batch), (batch, *in_shape))
            xn = np.asarray(x)
            fns = {"dense": functools.partial(dense_fn, masked, x)}
            for lay, apply in applies.items():
                if not _skipped(lay, x, kernels):
                    fns[lay] = functools.partial(apply, x)
            fns["scipy"] = functools.partial(scipy_fn, xn)
            with Load() as load:
                t = interleaved_medians(fns, repeats if batch < 1024 else 3, budget)
            ratios = "".join(
                f"{t[lay] / t['dense']:8.2f}" if lay in t else f"{'-':>8}"
                for lay in (*LAYOUTS, "scipy")
            )
            plan = ",".join(f[:2] for f in applies["auto"].plan(x).values())
            print(
                f"{density:7.0%} {batch:5d} {t['dense'] * 1e6:9.0f}{ratios} {load.cores:6.2f}"
                f"  [{plan}]"
            )
        x1 = jnp.ones((1, *in_shape))
        dense_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in kernels.values())
        kept = sum(leaf.nse for leaf in kernels.values())
        sizes = {lay: applies[lay].nbytes(x1) / dense_bytes for lay in ("bcoo", "bcsr", "ell")}
        index_bytes = 2 if all(k.shape[0] < 2**15 for k in kernels.values()) else 4
        byte_rows.append((density, sizes, kept * (4 + index_bytes) / dense_bytes))
    print(f"\n   bytes held / dense kernel bytes ({name})")
    print(f"{'density':>7}" + "".join(f"{lay:>8}" for lay in ("bcoo", "bcsr", "ell", "limit")))
    for density, sizes, limit in byte_rows:
        print(f"{density:7.0%}" + "".join(f"{v:8.3f}" for v in sizes.values()) + f"{limit:8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds: small sizes")
    args = parser.parse_args()
    if args.quick:
        densities, batches, repeats, width, budget = (0.08,), (1, 64), 3, 1024, 0.2
    else:
        densities, batches, repeats, width = (0.01, 0.05, 0.08, 0.10, 0.20), (1, 64, 1024), 5, 4096
        budget = 2.0
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {jax.device_count()} device(s)")
    run_case("LeNet-300-100", LeNet300100(), (28, 28, 1), densities, batches, repeats, budget)
    run_case(f"Dense {width}x{width}", Square(width), (width,), densities, batches, repeats, budget)


if __name__ == "__main__":
    main()
