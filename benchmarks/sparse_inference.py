"""Sparse inference speed against dense jit, per weight layout, measured side by side.

For LeNet-300-100 (``jaxprune.demo.models.LeNet300100``: 784-300-100-10, ReLU, fed 28x28x1
images it flattens) and a single 4096x4096 Dense layer, pruned to each density (same fraction
kept in every layer, smallest magnitudes pruned) and run at each batch size, prints the time of
``jaxprune.sparse.sparse_apply`` with every layout forced (``bcoo``, ``bcsr``, ``ell``, and
``csr``, jaxprune's native kernel, where it could be built) and with the automatic choice
(``auto``), of scipy's CSR (one thread) and of torch's CSR (if torch is installed), each divided
by the time of the dense model under ``jax.jit`` (lower is better; < 1 is faster than dense).
Timings are interleaved round by round and the median is taken
(``measure.interleaved_medians``), since absolute times drift on a shared machine; ``others`` is
the cores other processes kept busy during that row (``measure.Load``). ``limit`` is the kept
weights plus a 2-byte index each over the dense weights: the least a batch-1 pass can stream.
A last table gives the bytes each layout holds against the dense weights.

Each table runs twice, in its own process per dispatch mode, since JAX reads
``jax_cpu_enable_async_dispatch`` when it makes the CPU client: ``async`` (JAX's default) and
``sync`` (each call runs on the calling thread: the per-call path for latency-bound serving).

Run ``python benchmarks/sparse_inference.py`` (about 8 minutes on 2 cores) or ``--quick`` (about
a minute). ``-`` marks a layout skipped because its temporary would exceed
``jaxprune._layouts.MAX_TEMPORARY``.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from measure import Load, interleaved_medians

from jaxprune import _layouts, _native
from jaxprune.demo.models import LeNet300100
from jaxprune.masks import apply_masks, masks_for_sparsity
from jaxprune.sparse import sparse_apply, to_bcoo

PEERS = ("scipy", "torch")
LAYOUTS = ("bcoo", "bcsr", "ell", *(("csr",) if _native.available() else ()), "auto")


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


def _torch_forward(model_name: str, params: dict) -> Callable[[np.ndarray], object] | None:
    """The same network on torch CSR matrices of W.T, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    layers = [
        (
            torch.from_numpy(np.ascontiguousarray(np.asarray(p["kernel"]).T)).to_sparse_csr(),
            torch.from_numpy(np.asarray(p["bias"])) if "bias" in p else None,
        )
        for _, p in sorted(params.items())
    ]

    def forward(x: np.ndarray) -> object:
        with torch.inference_mode():
            h = torch.from_numpy(x.reshape(x.shape[0], -1)).T
            for i, (wt, b) in enumerate(layers):
                h = wt @ h
                if b is not None:
                    h = h + b[:, None]
                if i < len(layers) - 1 and model_name == "lenet":
                    h = torch.relu(h)
            return h.T

    return forward


def _skipped(layout: str, x: jax.Array, kernels: dict) -> bool:
    """Whether a forced layout's gather temporary exceeds the library's cap for these rows."""
    return any(
        _layouts.temporary_size(
            layout,
            _layouts.Entries(leaf.shape, np.asarray(leaf.indices), np.asarray(leaf.data)),
            x.shape[0],
            (0,),
        )
        > _layouts.MAX_TEMPORARY
        for leaf in kernels.values()
    )


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
    header += "".join(f"{lay:>8}" for lay in (*LAYOUTS, *PEERS))
    header += f"{'limit':>7} {'others':>6}  auto plan"
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
        kind = "lenet" if "LeNet" in name else "square"
        peers = {"scipy": _scipy_forward(kind, masked), "torch": _torch_forward(kind, masked)}
        kept = sum(leaf.nse for leaf in kernels.values())
        dense_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in kernels.values())
        limit = kept * 6 / dense_bytes
        for batch in batches:
            x = jax.random.normal(jax.random.key(batch), (batch, *in_shape))
            xn = np.asarray(x)
            fns = {"dense": functools.partial(dense_fn, masked, x)}
            for lay, apply in applies.items():
                if not _skipped(lay, x, kernels):
                    fns[lay] = functools.partial(apply, x)
            for peer, forward in peers.items():
                if forward is not None:
                    fns[peer] = functools.partial(forward, xn)
            with Load() as load:
                t = interleaved_medians(fns, repeats if batch < 1024 else 3, budget)
            ratios = "".join(
                f"{t[lay] / t['dense']:8.2f}" if lay in t else f"{'-':>8}"
                for lay in (*LAYOUTS, *PEERS)
            )
            plan = ",".join(f[:2] for f in applies["auto"].plan(x).values())
            print(
                f"{density:7.0%} {batch:5d} {t['dense'] * 1e6:9.0f}{ratios}{limit:7.3f}"
                f" {load.cores:6.2f}  [{plan}]",
                flush=True,
            )
        x1 = jnp.ones((1, *in_shape))
        held = [lay for lay in LAYOUTS if lay != "auto"]
        sizes = {lay: applies[lay].nbytes(x1) / dense_bytes for lay in held}
        index_bytes = 2 if all(k.shape[0] < 2**15 for k in kernels.values()) else 4
        byte_rows.append((density, sizes, kept * (4 + index_bytes) / dense_bytes))
    print(f"\n   bytes held / dense kernel bytes ({name})")
    print(f"{'density':>7}" + "".join(f"{lay:>8}" for lay in (*held, "limit")))
    for density, sizes, limit in byte_rows:
        print(f"{density:7.0%}" + "".join(f"{v:8.3f}" for v in sizes.values()) + f"{limit:8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: small sizes")
    parser.add_argument("--mode", choices=("async", "sync"), help="run one mode in this process")
    args = parser.parse_args()
    if args.mode is None:
        for mode in ("async", "sync"):
            cmd = [sys.executable, __file__, "--mode", mode] + (["--quick"] if args.quick else [])
            subprocess.run(cmd, check=True)
        return
    jax.config.update("jax_cpu_enable_async_dispatch", args.mode == "async")
    if args.quick:
        densities, batches, repeats, width, budget = (0.08,), (1, 64), 3, 1024, 0.2
    else:
        densities, batches, repeats, width = (0.05, 0.08, 0.20), (1, 8, 64, 1024), 5, 4096
        budget = 1.5
    print(
        f"\n##### {args.mode} dispatch; jax {jax.__version__} on {jax.devices()[0].platform}; "
        f"native kernel: {_native.why_unavailable() or 'available'}"
    )
    run_case("LeNet-300-100", LeNet300100(), (28, 28, 1), densities, batches, repeats, budget)
    run_case(f"Dense {width}x{width}", Square(width), (width,), densities, batches, repeats, budget)


if __name__ == "__main__":
    main()
