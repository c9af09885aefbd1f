"""A native CSR kernel for ``x @ W`` at small batch, behind ``jax.ffi``, built on first use.

XLA's own sparse layouts (``jaxprune._layouts``) pay for a gather temporary or a padded batch at
batch 1; this kernel streams each kept weight once: ``W.T`` in CSR (one row per output feature,
int32 row pointers, uint16 input indices where the input size allows, else int32, float32
values), each output a dot product of its kept weights with the inputs they touch. Rows of ``x``
go in tiles of 8, and products above about 2**18 multiply-adds are split over XLA's intra-op
thread pool by output features (``jaxprune/_native/csr.cc``).

The C++ source is compiled on first use with the system compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``) at ``-O3`` for the baseline instruction set of the machine's
architecture (no ``-march=native``: the cache may be shared between machines), into
``$JAXPRUNE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/jaxprune``, else ``~/.cache/jaxprune``), in a
file named by a hash of the source, the flags, the compiler and jax's version. Each process
compiles to a temporary name and renames it into place, so parallel processes never load a
half-written library. When there is no compiler, the build fails or ``JAXPRUNE_NATIVE=0`` is set,
:func:`available` is False and :func:`why_unavailable` says why; nothing here raises at import,
and sparse inference then uses XLA's layouts only.

>>> import numpy as np
>>> w = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]], np.float32)  # (K, N) = (3, 2)
>>> layout = from_dense(w)
>>> x = jnp.array([[1.0, 1.0, 1.0]], jnp.float32)
>>> np.asarray(csr_matmul(layout, x)).tolist() if available() else [[4.0, 2.0]]
[[4.0, 2.0]]
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Layout = dict[str, Any]

SOURCE = Path(__file__).parent / "_native" / "csr.cc"
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")
BUILD_TIMEOUT_S = 300
_TARGETS = {"i32": "JaxpruneCsrMatmulI32", "u16": "JaxpruneCsrMatmulU16"}
_INDEX_DTYPES = {np.dtype(np.int32): "i32", np.dtype(np.uint16): "u16"}


def cache_dir() -> Path:
    """Where the compiled kernel is kept: ``$JAXPRUNE_CACHE_DIR`` or the user's cache folder."""
    if env := os.environ.get("JAXPRUNE_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxprune"


def _compiler() -> str | None:
    """The C++ compiler to build with: ``$CXX``, else the first of c++, g++, clang++ on PATH."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for name in names:
        if path := shutil.which(name):
            return path
    return None


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), *map(str.encode, (*FLAGS, compiler, jax.__version__))):
        key.update(part)
        key.update(b"\0")
    key.update(platform.machine().encode())
    return cache_dir() / f"csr-{key.hexdigest()[:20]}.so"


def _build(compiler: str, target: Path) -> None:
    """Compiles the kernel to ``target``, through a temporary file renamed into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        subprocess.run(cmd, check=True, capture_output=True, timeout=BUILD_TIMEOUT_S)
        os.replace(tmp, target)  # atomic: a parallel build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _load() -> str | None:
    """Builds (once per cache key) and registers the kernel; returns why not, or None if it did."""
    if os.environ.get("JAXPRUNE_NATIVE", "1") == "0":
        return "disabled by JAXPRUNE_NATIVE=0"
    compiler = _compiler()
    if compiler is None:
        return "no C++ compiler found ($CXX, c++, g++, clang++)"
    try:
        path = _library_path(compiler)
        if not path.exists():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))
        for suffix, symbol in _TARGETS.items():
            capsule = jax.ffi.pycapsule(getattr(lib, symbol))
            jax.ffi.register_ffi_target(f"jaxprune_csr_matmul_{suffix}", capsule, platform="cpu")
    except subprocess.CalledProcessError as err:
        return f"compiling {SOURCE.name} failed: {err.stderr.decode(errors='replace')[-2000:]}"
    except (OSError, subprocess.TimeoutExpired, AttributeError, ValueError) as err:
        return f"building or loading {SOURCE.name} failed: {err!r}"
    return None


def available() -> bool:
    """Whether the native kernel is built and registered (builds it on the first call)."""
    return _load() is None


def why_unavailable() -> str | None:
    """Why :func:`available` is False (no compiler, the compiler's error), or None if it is True."""
    return _load()


def build(
    rows: np.ndarray,
    cols: np.ndarray,
    vals: np.ndarray,
    shape: tuple[int, int],
    *,
    size: int | None = None,
) -> Layout:
    """The CSR layout of ``W.T`` for the ``(K, N)`` matrix whose kept entries are given.

    Same arguments as ``jaxprune._layouts.build``: ``rows`` are input positions (``< K``),
    ``cols`` output positions (``< N``). The layout is a dict of arrays (a ``jax.jit``
    argument): ``indptr`` (int32, ``N + 1``), ``idx`` (uint16 if ``K <= 65536``, else int32),
    ``val`` (float32) and ``k``, an empty ``(K, 0)`` array that records ``K`` in its shape, so
    that :func:`csr_matmul` can check ``x`` against it under ``jax.jit``.

    Raises:
        ValueError: if an index is out of range, or there are more than 2**31 - 1 entries.
    """
    k_in, n_out = shape
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    if rows.size and (
        rows.min() < 0 or rows.max() >= k_in or cols.min() < 0 or cols.max() >= n_out
    ):
        raise ValueError(f"kept entries out of range for a matrix of shape {shape}.")
    if rows.size > np.iinfo(np.int32).max:
        raise ValueError(f"{rows.size} kept entries; the int32 row pointers hold at most 2**31-1.")
    order = np.lexsort((rows, cols))  # by output, inputs ascending within each
    counts = np.bincount(cols, minlength=n_out)
    index_dtype = np.uint16 if k_in <= np.iinfo(np.uint16).max + 1 else np.int32
    pad = max((size or 0) - rows.size, 0)
    return {
        "indptr": jnp.asarray(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)),
        "idx": jnp.asarray(np.pad(rows[order], (0, pad)).astype(index_dtype)),
        "val": jnp.asarray(np.pad(np.asarray(vals, np.float32)[order], (0, pad))),
        "k": jnp.zeros((k_in, 0), jnp.float32),
    }


def from_dense(w: np.ndarray) -> Layout:
    """:func:`build` from a dense ``(K, N)`` matrix, keeping its nonzero entries."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w: expected a 2-D (K, N) matrix, got shape {w.shape}.")
    rows, cols = np.nonzero(w)
    return build(rows, cols, w[rows, cols], w.shape)


def csr_matmul(layout: Layout, x: jax.Array) -> jax.Array:
    """``x @ W`` for float32 ``x`` of shape ``(..., K)``, ``W`` in the layout of :func:`build`.

    Works under ``jax.jit``, and under ``jax.vmap`` over ``x`` (the mapped axis becomes more rows
    of the batch); a layout mapped under ``vmap`` is refused by the kernel. No gradient is
    defined: this is an inference kernel. Call only when :func:`available` is True.

    Raises:
        TypeError: if ``x`` is not float32, or a layout array has the wrong dtype.
        ValueError: if ``x``'s last axis is not ``K``, or the layout's arrays disagree.
    """
    x = jnp.asarray(x)
    k_in = layout["k"].shape[0]
    indptr, idx, val = layout["indptr"], layout["idx"], layout["val"]
    if x.dtype != jnp.float32:
        raise TypeError(f"x: expected float32 inputs, got {x.dtype}; cast with x.astype.")
    if x.ndim < 1 or x.shape[-1] != k_in:
        raise ValueError(f"x: expected shape (..., {k_in}) to match the layout, got {x.shape}.")
    suffix = _INDEX_DTYPES.get(np.dtype(idx.dtype))
    if suffix is None or indptr.dtype != jnp.int32 or val.dtype != jnp.float32:
        raise TypeError(
            "layout: expected indptr int32, idx int32 or uint16, val float32; got "
            f"{indptr.dtype}, {idx.dtype}, {val.dtype}."
        )
    if indptr.ndim != 1 or idx.shape != val.shape or idx.ndim != 1:
        raise ValueError(
            f"layout: expected 1-D indptr and equal 1-D idx and val, got shapes {indptr.shape}, "
            f"{idx.shape}, {val.shape}."
        )
    if why := why_unavailable():
        raise RuntimeError(f"the native CSR kernel is not available: {why}")
    out = jax.ShapeDtypeStruct((*x.shape[:-1], indptr.shape[0] - 1), jnp.float32)
    call = jax.ffi.ffi_call(f"jaxprune_csr_matmul_{suffix}", out, vmap_method="expand_dims")
    return call(indptr, idx, val, x)
