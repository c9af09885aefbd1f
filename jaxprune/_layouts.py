"""Weight layouts for ``x @ W`` with a pruned ``W``, and the whole policy that picks one per product.

The rule (``formats='auto'``) is :func:`choose_plan`; the calibration (``formats='calibrate'``)
times :func:`calibration_candidates` and keeps :func:`calibrated`'s pick. Every threshold lives
here, beside the measurement it comes from.

Every layout is built once, on the host, from the kept entries of a 2-D matrix ``W`` of shape
``(K, N)`` (``K`` inputs, ``N`` outputs) and is a dict of arrays, so it can be a ``jax.jit``
argument. :func:`matmul` computes ``x @ W`` for ``x`` of shape ``(rows, K)`` in any layout:

- ``'dense'``: the full ``(K, N)`` matrix; XLA's dense GEMM. Wins at high density and large batch.
- ``'bcoo'``: ``jax.experimental.sparse.BCOO``; gather, multiply, scatter-add with an
  ``nse x rows`` temporary. Kept as a reference; it rarely wins on CPU.
- ``'bcsr'``: ``BCSR`` of ``W.T``, run as ``(W.T @ x.T).T``, the only orientation with a native
  fast path; the batch is padded to a multiple of 8 since fewer rows take a much slower route.
- ``'csr'``: CSR of ``W.T`` run by jaxprune's native kernel (:mod:`jaxprune._native`, an XLA
  FFI call): each kept weight is read once, with no temporary and no padded batch; the fastest
  layout at small batch. Only where the kernel could be built (:func:`jaxprune._native.available`).
- ``'ell'``: row-padded gather layout of ``W.T`` (ELLPACK): for each output ``j`` the input indices
  (int16 when ``K`` allows) and values of its kept weights, padded to the longest column with
  weight 0. ``x @ W`` is then one gather and one reduction, with no scatter, which streams the
  weights once at batch 1; its ``rows x N x width`` temporary rules it out for large batches.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from jaxprune import _native

Layout = dict[str, Any]

FORMATS = ("dense", "bcoo", "bcsr", "ell", "csr")
SPARSE_FORMATS = ("bcoo", "bcsr", "ell", "csr")

# Thresholds of the default rule, measured on a 2-core CPU with benchmarks/sparse_inference.py
# (LeNet-300-100 and a 4096x4096 layer at 1-20% density, batch 1/64/1024; figures in its docstring).
# Below 8 rows a small network is dispatch-bound, and a sparse layer next to a dense one cost
# LeNet-300-100 about 60 us more than all-dense at batch 1: only large layers go sparse there,
# unless every layer can (see choose_plan).
# A single row on a large layer: the gather layout streams the weights once; 0.3-0.55x dense at
# 5-10% density, 0.93x at 20%.
# Up to 256 rows BCSR wins to about 10% density. At 1024 rows it ran 0.44-0.74x dense at 5% on
# LeNet-300-100 and a 4096x4096 layer (4 quiet runs, both dispatch modes) but 0.65-1.18x at 8%.
SMALL_BATCH_ROWS = 8
LARGE_LAYER_SIZE = 1 << 20
ELL_MAX_DENSITY = 0.12
BCSR_MAX_ROWS = 256
BCSR_MAX_DENSITY = 0.12
BCSR_LARGE_BATCH_MAX_DENSITY = 0.06
# Where the native CSR kernel can run (float32 inputs; _native.available()), it wins at small
# batch: per layer 0.13-0.7x dense at 1 and 8 rows on 784x300 to 4096x4096 layers at 5-20%
# density (BCSR 0.16-2.9x, the gather layout 0.46-2.6x there), 0.65-0.98x at 35%; from 64 rows
# BCSR beats it (0.29-0.76x against 0.49-0.98x at 5-10%). Measured one layer at a time,
# interleaved, 2 quiet cores (others 0.00-0.06), jax 0.10.2, one run; the two full runs of
# benchmarks/sparse_inference.py agree (csr 0.10-0.86x dense at 1 and 8 rows, 5-20% kept).
# Above one row its edge over dense shrinks with density: at 8 rows and 20% kept the 4096x4096
# layer ran 0.90-1.30x dense on a second machine (AMD EPYC, two full runs of
# benchmarks/sparse_inference.py in both dispatch modes), 0.37-0.59x at 8%, so 2-8 rows take it
# to BCSR's density, and a single row (0.37-0.75x at 20% there) to CSR_MAX_DENSITY.
CSR_MAX_ROWS = 8
CSR_MAX_DENSITY = 0.2
CSR_BATCH_MAX_DENSITY = 0.12
MIN_SPARSE_SIZE = 4096  # tinier layers cost less than the bookkeeping either way: keep them dense
# An embedding lookup reads only the rows it needs, so a dense table is hard to beat: the gather
# layout's gather and scatter took 1.2-1.4x (1 and 64 tokens) and 2-3.9x (1024 tokens) the time
# of a dense take on 32000x512 tables at 3% and 10% kept and a 1000x64 one at 30% (2 cores).
LOOKUP_FORMAT = "dense"
# formats='calibrate' keeps a sparse format only if it beats dense by 10% (timings drift that much
# on shared cores), and skips layouts whose gather temporary exceeds 2**26 elements (256 MiB).
CALIBRATION_MARGIN = 0.9
MAX_TEMPORARY = 1 << 26

K = TypeVar("K")  # a product's key in choose_plan: a path, or (path, use)


class Entries(NamedTuple):
    """The kept entries of an N-D kernel: their ``indices`` (``nse x ndim``) and values."""

    shape: tuple[int, ...]
    indices: np.ndarray
    vals: np.ndarray

    @property
    def density(self) -> float:
        return self.vals.size / max(math.prod(self.shape), 1)

    def view(self, contract: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
        """``(rows, cols, vals, (K, N))`` of the kernel as the matrix a product contracts.

        The matrix is the kernel transposed to ``(*contract, *free)`` and reshaped to ``(K, N)``:
        a product contracting axes ``contract`` of the kernel is ``x2d @ matrix``.
        """
        free = tuple(a for a in range(len(self.shape)) if a not in contract)
        rows, cols = self._ravel(contract), self._ravel(free)
        return rows, cols, self.vals, self.matrix(contract)

    def matrix(self, contract: tuple[int, ...]) -> tuple[int, int]:
        """The ``(K, N)`` shape of :meth:`view`."""
        k_in = math.prod(self.shape[a] for a in contract)
        return (k_in, math.prod(self.shape) // max(k_in, 1))

    def _ravel(self, axes: tuple[int, ...]) -> np.ndarray:
        if not axes:
            return np.zeros(self.vals.size, np.int64)
        dims = tuple(self.shape[a] for a in axes)
        return np.ravel_multi_index(tuple(self.indices[:, list(axes)].T), dims)

    def slices(self) -> list[Entries]:
        """One :class:`Entries` per index of axis 0 (the layers of a scan-stacked kernel)."""
        which = self.indices[:, 0]
        return [
            Entries(self.shape[1:], self.indices[which == i, 1:], self.vals[which == i])
            for i in range(self.shape[0])
        ]


def build(
    fmt: str,
    rows: np.ndarray,
    cols: np.ndarray,
    vals: np.ndarray,
    shape: tuple,
    *,
    size: int | None = None,
) -> Layout:
    """Builds layout ``fmt`` of the ``(K, N)`` matrix whose kept entries are ``(rows, cols, vals)``.

    ``size`` pads the layout to a larger :func:`layout_size` (the ``nse`` of ``bcoo``/``bcsr``,
    the width of ``ell``) with zero weights, so that layouts of several matrices stack.
    """
    k_in, n_out = shape
    if fmt == "dense":
        w = np.zeros(shape, vals.dtype)
        w[rows, cols] = vals
        return {"w": jnp.asarray(w)}
    if fmt in ("bcoo", "bcsr") and size is not None and size > vals.size:
        # Zero weights at the last entry: they sort last in both layouts and add nothing.
        pad = size - vals.size
        rows = np.concatenate([rows, np.full(pad, k_in - 1, rows.dtype)])
        cols = np.concatenate([cols, np.full(pad, n_out - 1, cols.dtype)])
        vals = np.concatenate([vals, np.zeros(pad, vals.dtype)])
    if fmt == "csr":
        return _native.build(rows, cols, vals, shape, size=size)
    if fmt == "bcoo":
        idx = np.stack([rows, cols], axis=1).astype(np.int32)
        return {"w": jsparse.BCOO((jnp.asarray(vals), jnp.asarray(idx)), shape=shape)}
    # Both W.T layouts group the kept entries by output column, in input order.
    order = np.lexsort((rows, cols))
    rows, cols, vals = rows[order], cols[order], vals[order]
    counts = np.bincount(cols, minlength=n_out)
    if fmt == "bcsr":
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        mat = jsparse.BCSR(
            (jnp.asarray(vals), jnp.asarray(rows.astype(np.int32)), jnp.asarray(indptr)),
            shape=(n_out, k_in),
        )
        return {"wt": mat}
    if fmt == "ell":
        width = max(int(counts.max(initial=0)), 1, size or 1)
        slot = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
        # int16 indices where they fit: the layout is streamed once per call at batch 1.
        idx = np.zeros((n_out, width), np.int16 if k_in <= np.iinfo(np.int16).max else np.int32)
        val = np.zeros((n_out, width), vals.dtype)
        idx[cols, slot] = rows
        val[cols, slot] = vals
        return {"idx": jnp.asarray(idx), "val": jnp.asarray(val)}
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}.")


def layout_size(fmt: str, cols: np.ndarray, n_out: int) -> int:
    """The size :func:`build` pads to: kept count (``bcoo``, ``bcsr``, ``csr``), longest column
    (``ell``)."""
    if fmt == "ell":
        return max(int(np.bincount(cols, minlength=n_out).max(initial=0)), 1)
    return cols.size


def build_stacked(
    fmt: str, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], shape: tuple[int, int]
) -> Layout:
    """Layout ``fmt`` of each ``(rows, cols, vals)`` matrix of ``shape``, padded alike and stacked.

    Every array of the result has a leading axis over ``parts``; index it with
    ``jax.tree.map(lambda a: a[i], layout)`` to get matrix ``i``'s layout.
    """
    size = max(layout_size(fmt, cols, shape[1]) for _, cols, _ in parts)
    layouts = [build(fmt, *part, shape, size=size) for part in parts]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *layouts)


def matmul(fmt: str, layout: Layout, x: jax.Array) -> jax.Array:
    """Computes ``x @ W`` for ``x`` of shape ``(rows, K)`` with ``W`` held in layout ``fmt``."""
    if fmt == "dense":
        return x @ layout["w"].astype(x.dtype)
    if fmt == "bcoo":
        w = layout["w"]
        return x @ jsparse.BCOO((w.data.astype(x.dtype), w.indices), shape=w.shape)
    if fmt == "bcsr":
        wt = layout["wt"]
        wt = jsparse.BCSR((wt.data.astype(x.dtype), wt.indices, wt.indptr), shape=wt.shape)
        n_rows = x.shape[0]
        padded = jnp.pad(x, ((0, -n_rows % 8), (0, 0)))
        return (wt @ padded.T).T[:n_rows]
    if fmt == "csr":
        # The kernel reads float32; half-precision inputs round-trip exactly through it.
        if x.dtype in (jnp.bfloat16, jnp.float16):
            return _native.csr_matmul(layout, x.astype(jnp.float32)).astype(x.dtype)
        return _native.csr_matmul(layout, x)
    if fmt == "ell":
        # Indices are in range by construction; skipping the bounds handling is measurably faster.
        gathered = x.at[:, layout["idx"]].get(mode="promise_in_bounds")  # (rows, N, width)
        return jnp.einsum("bnw,nw->bn", gathered, layout["val"].astype(x.dtype))
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}.")


def lookup(fmt: str, layout: Layout, ids: jax.Array, n_out: int) -> jax.Array:
    """Rows ``ids`` of ``W`` (``(K, n_out)``; an embedding lookup), ``W`` held in layout ``fmt``.

    ``'dense'`` takes the rows; ``'ell'`` expects the gather layout of ``W.T`` (one padded row of
    column indices and values per row of ``W``) and scatters the gathered rows; ``'bcoo'`` and
    ``'bcsr'`` and ``'csr'`` multiply the one-hot rows. Dense won every case measured
    (see ``LOOKUP_FORMAT``).
    """
    if fmt == "dense":
        return jnp.take(layout["w"], ids, axis=0)
    if fmt == "ell":
        idx, val = layout["idx"][ids], layout["val"][ids]  # (*ids, width)
        flat_idx, flat_val = idx.reshape(-1, idx.shape[-1]), val.reshape(-1, val.shape[-1])
        out = jnp.zeros((flat_idx.shape[0], n_out), val.dtype)
        out = out.at[jnp.arange(flat_idx.shape[0])[:, None], flat_idx].add(
            flat_val, mode="promise_in_bounds"
        )
        return out.reshape(*ids.shape, n_out)
    if fmt == "csr":
        k_in, dtype = layout["k"].shape[0], layout["val"].dtype
    else:
        w = layout["w"] if fmt == "bcoo" else layout["wt"]
        k_in, dtype = (w.shape[0] if fmt == "bcoo" else w.shape[1]), w.dtype
    one_hot = jax.nn.one_hot(ids.reshape(-1), k_in, dtype=dtype)
    return matmul(fmt, layout, one_hot).reshape(*ids.shape, -1)


class Product(NamedTuple):
    """What the rule knows of one product ``x2d @ W2d``: enough to choose its layout."""

    density: float  # kept fraction of the kernel
    rows: int  # rows of x2d: the batch, times a sequence's positions or a conv's outputs
    shape: tuple[int, int]  # (K, N) of W2d
    use: str = "matmul"  # 'matmul', 'conv' (patches times the kernel) or 'lookup'
    stacked: bool = False  # one slice of a scan-stacked kernel, picked by a dynamic index
    dtype: str = "float32"  # of x2d; the native kernel runs float32


def _native_for(product: Product) -> bool:
    """Whether the native CSR kernel may run this product (builds it on the first call)."""
    return product.dtype == "float32" and _native.available()


def csr_max_density(rows: int) -> float:
    """The highest density at which the rule takes the native ``'csr'`` kernel for ``rows`` rows."""
    return CSR_MAX_DENSITY if rows == 1 else CSR_BATCH_MAX_DENSITY


def choose(product: Product) -> str:
    """The default rule for one matrix product: the layout expected fastest for it.

    Dense whenever in doubt (high density, tiny layers, very large batches), so that the sparse
    path is never slower than the dense one.
    """
    density, rows, shape = product.density, product.rows, product.shape
    size = math.prod(shape)
    if size < MIN_SPARSE_SIZE:
        return "dense"
    if rows <= CSR_MAX_ROWS and density <= csr_max_density(rows) and _native_for(product):
        return "csr"
    if rows < SMALL_BATCH_ROWS and size < LARGE_LAYER_SIZE:
        return "dense"
    if rows == 1:
        return "ell" if density <= ELL_MAX_DENSITY else "dense"
    if rows <= BCSR_MAX_ROWS and density <= BCSR_MAX_DENSITY:
        return "bcsr"
    if density <= BCSR_LARGE_BATCH_MAX_DENSITY:
        return "bcsr"
    return "dense"


def choose_plan(products: dict[K, Product]) -> dict[K, str]:
    """The default rule for a whole model: ``{key: Product}`` to ``{key: format}``.

    Per product :func:`choose` (which takes the native ``'csr'`` kernel at small batch where it
    can run, else XLA's layouts), with these exceptions:

    - Convolutions stay dense: XLA's own convolution beat patches times a sparse matrix on
      LeNet-5 (batch 1: 1.55x slower with conv2 in BCSR).
    - Embedding lookups use ``LOOKUP_FORMAT``.
    - Stacked slices under ``LARGE_LAYER_SIZE`` stay dense: inside a scan each slice's layout is
      picked by a dynamic index, and small stacked layers in BCSR made the ``nnx.scan``
      Transformer of ``examples/transformer.py`` 1.8x slower than dense at batch 1 (122 vs
      69 us, 8% kept).
    - Below ``SMALL_BATCH_ROWS`` rows, in a model whose products are all matrix products of
      unstacked kernels at most ``BCSR_MAX_DENSITY`` dense, the layers under ``LARGE_LAYER_SIZE``
      run sparse too, in ``'csr'`` where it can run, else BCSR (LeNet-300-100 at batch 1 and
      1-10% density in BCSR: 0.4-0.8x dense, where one dense layer among sparse ones made the
      pass slower than all-dense). A model with a convolution,
      a lookup or a stacked layer keeps those dense anyway, and one dense product among sparse
      ones costs more than it saves (the ResNet example's 320-weight head in BCSR: 115 vs
      109 us at batch 1), so there each layer is on its own.
    """
    plan = {key: choose(product) for key, product in products.items()}
    for key, product in products.items():
        if product.use == "conv":
            plan[key] = "dense"
        elif product.use == "lookup":
            plan[key] = LOOKUP_FORMAT
        elif product.stacked and math.prod(product.shape) < LARGE_LAYER_SIZE:
            plan[key] = "dense"
    if any(p.use != "matmul" or p.stacked for p in products.values()):
        return plan
    small = [
        key
        for key, p in products.items()
        if p.rows < SMALL_BATCH_ROWS and math.prod(p.shape) < LARGE_LAYER_SIZE
    ]
    if not small:
        return plan
    native = all(p.rows <= CSR_MAX_ROWS and _native_for(p) for p in products.values())
    fmt = "csr" if native else "bcsr"
    if all(
        p.density <= (csr_max_density(p.rows) if native else BCSR_MAX_DENSITY)
        for p in products.values()
    ):
        plan.update({key: fmt for key in small if plan[key] == "dense"})
    return plan


def temporary_size(fmt: str, entries: Entries, rows: int, contract: tuple[int, ...]) -> int:
    """Elements of the gather temporary of ``bcoo`` (kept x rows) or ``ell`` (N x width x rows)."""
    if fmt == "bcoo":
        return entries.vals.size * rows
    if fmt != "ell":
        return 0
    _, cols, _, (_, n_out) = entries.view(contract)
    return n_out * int(np.bincount(cols, minlength=n_out).max(initial=1)) * rows


def calibration_candidates(entries: Entries, rows: int, contract: tuple[int, ...]) -> list[str]:
    """The formats ``formats='calibrate'`` times for a product: all but those whose gather
    temporary would exceed ``MAX_TEMPORARY`` elements, and ``'csr'`` where the native kernel
    cannot run."""
    return [
        f
        for f in FORMATS
        if temporary_size(f, entries, rows, contract) <= MAX_TEMPORARY
        and (f != "csr" or _native.available())
    ]


def calibrated(times: dict[str, float]) -> str:
    """The calibration's pick from measured times: the fastest, if a sparse format, only when it
    beats dense by ``CALIBRATION_MARGIN``."""
    best = min(times, key=times.__getitem__)
    return best if times[best] < CALIBRATION_MARGIN * times["dense"] else "dense"
