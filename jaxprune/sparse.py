"""Sparse export (BCOO) and jit-compiled sparse inference for Flax Linen and NNX models.

The interchange format is a pytree in which every pruned kernel is a
``jax.experimental.sparse.BCOO`` of the kernel's own N-D shape holding exactly the kept weights
(Han et al. 2015, Sec. 4 store only the surviving connections), and every other leaf is unchanged.

Inference (:func:`sparse_apply`) runs the model's own Flax code and replaces only the products of
its pruned weights (Dense/DenseGeneral, Einsum, Conv kernels and Embed tables, scan-stacked ones
included), through the hooks of :mod:`jaxprune._hooks`. Every product runs as ``x2d @ W2d`` on a
2-D view of the kernel (:mod:`jaxprune._products`); a convolution as its patches times the kernel
reshaped to ``(kh * kw * cin, cout)``. For each product and input shape, the weights are held in
the layout (dense, BCOO, BCSR, a row-padded gather layout, or CSR run by jaxprune's native
kernel where a C++ compiler built it; see :mod:`jaxprune._layouts`)
expected to be fastest; dense whenever in doubt (:mod:`jaxprune._apply`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.sparse import BCOO

from jaxprune import _layouts, _native
from jaxprune._apply import FormatSpec, SparseApply
from jaxprune._hooks import Kernels, bcoo_paths, is_bcoo, linen_runner, nnx_runner
from jaxprune._options import is_traced
from jaxprune._tree import (
    PyTree,
    Stacked,
    Where,
    check_masks,
    default_where,
    is_array,
    path_str,
    stacked_axes,
)


def to_bcoo(params: PyTree, masks: PyTree, *, where: Where | None = None) -> PyTree:
    """Exports pruned params as a pytree whose pruned kernels are ``BCOO`` matrices.

    Every leaf selected by ``where`` (default :func:`jaxprune.default_where`) whose mask prunes at
    least one entry becomes a ``BCOO`` of the leaf's own shape and dtype with ``nse`` equal to its
    kept count, indices sorted and unique, ``n_batch = n_dense = 0``. Pruned entries are dropped
    whatever their value; a kept weight equal to 0 is kept. A selected leaf whose mask is all
    ``True`` holds no pruned connection and stays the dense array it is, so a partly pruned model
    exports (and runs under :func:`sparse_apply`) with its unpruned layers dense. Every other leaf
    is returned as it is.

    A Conv kernel keeps its ``(kh, kw, cin, cout)`` shape, so the tree describes itself and
    :func:`to_dense` is exact; the convolution it runs is ``patches @ kernel.reshape(-1, cout)``
    with patches ordered ``(kh, kw, cin)``, which is what :func:`sparse_apply` does.

    Args:
      params: a Linen ``variables['params']`` dict or an NNX ``nnx.state(model, nnx.Param)``.
      masks: a boolean mask tree matching ``params`` (see ``jaxprune.masks.compute_masks``).
      where: ``where(path, leaf) -> bool`` choosing the exported leaves; use the rule the masks
        were made with.

    Returns:
      A pytree with the structure of ``params``; its pruned leaves are ``BCOO`` objects, the
      others the leaves of ``params``.

    Raises:
      ValueError: if ``masks`` does not match ``params``, or a leaf not selected by ``where`` has
        a mask that prunes something.
      TypeError: if a mask of a selected leaf is not boolean, or a leaf is a tracer (the number of
        kept weights must be concrete).

    >>> import numpy as np
    >>> params = {'Dense_0': {'kernel': np.array([[1.0, 0.5], [2.0, 0.0]]), 'bias': np.zeros(2)}}
    >>> masks = {'Dense_0': {'kernel': np.array([[True, False], [True, True]]),
    ...                      'bias': np.ones(2, bool)}}
    >>> k = to_bcoo(params, masks)['Dense_0']['kernel']
    >>> k.nse, k.indices.tolist(), k.data.tolist()
    (3, [[0, 0], [1, 0], [1, 1]], [1.0, 2.0, 0.0])
    >>> masks['Dense_0']['kernel'][0, 1] = True  # nothing pruned: the kernel stays dense
    >>> type(to_bcoo(params, masks)['Dense_0']['kernel']).__name__
    'ndarray'
    """
    check_masks(params, masks)
    where = default_where if where is None else where

    def one(keypath: tuple, leaf: Any, mask: Any) -> Any:
        path = path_str(keypath)
        for name, value in (("params", leaf), ("masks", mask)):
            if is_traced(value):
                raise TypeError(
                    f"{name}[{path!r}] is a tracer: to_bcoo needs concrete arrays, since the "
                    "number of kept weights sets the BCOO size. Call it outside jax.jit."
                )
        if not where(path, leaf):
            if is_array(mask) and not np.all(np.asarray(mask)):
                raise ValueError(
                    f"masks[{path!r}] prunes entries of a leaf that `where` does not export; "
                    "pass to_bcoo the `where` the masks were computed with."
                )
            return leaf
        mask = np.asarray(mask)
        if mask.all():
            return leaf
        indices = np.argwhere(mask).astype(np.int32)
        data = np.asarray(leaf)[mask]
        return BCOO(
            (jnp.asarray(data), jnp.asarray(indices)),
            shape=tuple(leaf.shape),
            indices_sorted=True,
            unique_indices=True,
        )

    return jax.tree_util.tree_map_with_path(one, params, masks)


def to_dense(exported: PyTree) -> PyTree:
    """Turns every ``BCOO`` leaf of an exported tree back into a dense array.

    The inverse of :func:`to_bcoo`: kept weights come back bit for bit (entries are set, not
    summed, so ``-0.0`` survives) and pruned ones are exactly ``0``. Other leaves are unchanged.

    Args:
      exported: a tree from :func:`to_bcoo` (or loaded from storage).

    Returns:
      The tree with each ``BCOO`` replaced by a dense ``jax.Array`` of its shape and dtype.

    Raises:
      ValueError: if a ``BCOO`` has batch or dense dimensions (not produced by :func:`to_bcoo`).

    >>> import numpy as np
    >>> params = {'kernel': np.array([[1.0, -2.0], [3.0, 4.0]])}
    >>> masks = {'kernel': np.array([[True, False], [False, True]])}
    >>> to_dense(to_bcoo(params, masks))['kernel'].tolist()
    [[1.0, 0.0], [0.0, 4.0]]
    """

    def one(keypath: tuple, leaf: Any) -> Any:
        if not is_bcoo(leaf):
            return leaf
        if leaf.n_batch or leaf.n_dense:
            raise ValueError(
                f"exported[{path_str(keypath)!r}] is a BCOO with n_batch={leaf.n_batch}, "
                f"n_dense={leaf.n_dense}; expected 0 and 0 as written by to_bcoo."
            )
        # On the host: exact, and no new compilation for every shape and nse.
        dense = np.zeros(leaf.shape, leaf.dtype)
        dense[tuple(np.asarray(leaf.indices).T)] = np.asarray(leaf.data)
        return jnp.asarray(dense)

    return jax.tree_util.tree_map_with_path(one, exported, is_leaf=is_bcoo)


def _entries_of(kernel: BCOO) -> _layouts.Entries:
    return _layouts.Entries(
        tuple(kernel.shape), np.asarray(kernel.indices), np.asarray(kernel.data)
    )


def _check_formats(formats: Any, kernels: Mapping[str, _layouts.Entries]) -> None:
    choices = ("auto", "calibrate", *_layouts.FORMATS)
    if isinstance(formats, str):
        if formats not in choices:
            raise ValueError(f"formats={formats!r} is not one of {choices}.")
        _check_native(formats, "formats")
        return
    if not isinstance(formats, Mapping):
        raise TypeError(
            f"formats must be a string or a mapping from kernel path to format, got "
            f"{type(formats).__name__}."
        )
    for path, fmt in formats.items():
        if path not in kernels:
            raise ValueError(
                f"formats[{path!r}] names no pruned kernel; pruned kernels: {sorted(kernels)}."
            )
        if fmt not in _layouts.FORMATS:
            raise ValueError(f"formats[{path!r}] = {fmt!r} is not one of {_layouts.FORMATS}.")
        _check_native(fmt, f"formats[{path!r}]")


def _check_native(fmt: str, name: str) -> None:
    if fmt == "csr" and (why := _native.why_unavailable()):
        raise ValueError(
            f"{name} = 'csr' needs jaxprune's native CSR kernel, which is not available here: "
            f"{why}. Use 'auto' (XLA's layouts only, then) or another format."
        )


def _stacked_kernels(exported: PyTree, stacked: Stacked | None) -> frozenset[str]:
    """The BCOO kernels ``stacked`` names, checked: matched like ``compute_masks``'s, axis 0."""
    leaves = dict(bcoo_paths(exported))
    shapes = {
        path: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) if is_bcoo(leaf) else leaf
        for path, leaf in leaves.items()
    }
    weights = {p: is_bcoo(v) or default_where(p, v) for p, v in leaves.items()}
    axes = stacked_axes(shapes, stacked, weights)
    for path, axis in sorted(axes.items()):
        if axis != 0 and is_bcoo(leaves[path]):
            raise ValueError(
                f"stacked maps exported[{path!r}] to axis {axis}; sparse_apply runs stacked "
                "kernels along axis 0 only, the axis nn.scan (variable_axes={'params': 0}) and "
                "nnx.vmap/nnx.scan (in_axes=0) stack layers on."
            )
    return frozenset(p for p in axes if is_bcoo(leaves[p]))


def sparse_apply(
    model: nn.Module | nnx.Module,
    exported: PyTree,
    *,
    formats: FormatSpec = "auto",
    stacked: Stacked | None = None,
    variables: Mapping[str, Any] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> SparseApply:
    """Builds a jit-compiled forward pass of a pruned Flax model that runs its kernels sparse.

    The model's own code runs; only the products of its pruned (``BCOO``) weights are replaced,
    through the hooks Flax gives its layers (see :mod:`jaxprune._hooks`): ``nn.Dense``/
    ``nnx.Linear``, ``nn.DenseGeneral``/``nnx.LinearGeneral`` with any contracting axes (the
    query/key/value and out projections of attention), ``nn.Einsum``/``nnx.Einsum`` whose
    equation is a matrix product (each letter in input and output, kernel and output, or input
    and kernel; an ellipsis on the input side), ``nn.Conv``/``nnx.Conv`` (ungrouped,
    channel-last), and the table of ``nn.Embed``/``nnx.Embed``, looked up or used by ``attend``
    (a tied output head). Every product runs as ``x2d @ W2d``: the input flattened to ``(rows,
    contracted)`` times the kernel transposed to ``(contracted axes..., free axes...)`` and
    reshaped; a convolution's input is its patches, ordered ``(kh, kw, cin)``. Any other layer
    holding a pruned weight, DenseGeneral ``batch_dims`` and other Einsums raise an error naming
    it instead of computing a wrong result.

    The layout of each product is chosen per input shape, since the batch size is known when the
    pass is traced:

    - ``formats='auto'`` (default): a fixed rule measured on CPU, from each product's density,
      rows (the batch, times a sequence's positions or a convolution's outputs) and 2-D shape:
      sparse layouts where they were measured faster, dense whenever in doubt (high density,
      tiny layers, large batches, convolutions, embedding lookups). The rule and the figures
      behind each threshold are in ``jaxprune._layouts.choose_plan``.
    - ``formats='calibrate'``: times the layouts on each product's real shapes at the first call
      for a shape and keeps the fastest, a sparse one only by a margin over dense
      (``jaxprune._layouts.calibrated``).
    - a format name (``'dense'``, ``'bcoo'``, ``'bcsr'``, ``'ell'``, ``'csr'``) for every
      kernel, or a mapping from kernel path to format (unlisted kernels use the rule). For a
      lookup, ``'ell'`` gathers the padded rows of the table and the others multiply one-hot rows.

    ``'csr'`` is jaxprune's own CPU kernel (``jaxprune._native``, an XLA FFI call compiled from
    C++ with the system compiler on first use and cached; float32, no gradient). Without a
    compiler, or with ``JAXPRUNE_NATIVE=0``, the rule uses XLA's layouts only and asking for
    ``'csr'`` raises. For latency-bound serving at batch 1, turn off JAX's asynchronous dispatch
    before the first JAX call (``jax.config.update('jax_cpu_enable_async_dispatch', False)``):
    each call then runs on the calling thread and returns its result, saving the hand-off to
    another thread (``benchmarks/sparse_inference.py`` measures both modes).

    Scan-stacked layers (``nn.scan`` with ``variable_axes={'params': 0}``, or ``nnx.vmap``-built
    blocks run by ``nnx.scan``) export as ordinary BCOO of the whole ``(layers, ...)`` shape; say
    which with ``stacked``, as for ``compute_masks``. Each layer's slice gets its own layout (one
    format for the stack, padded to a common size), picked inside the scan by the slice index.

    Args:
      model: a Linen module, or an NNX module (put it in eval mode first if it has dropout or
        batch norm).
      exported: from :func:`to_bcoo`: the Linen ``params`` collection, or
        ``nnx.state(model, nnx.Param)`` for NNX.
      formats: how to choose layouts, as above.
      stacked: ``{pattern: 0}`` naming the kernels stacked along axis 0 by a scan (a leaf path,
        a subtree prefix such as ``'layers'``, or a glob).
      variables: Linen only: other collections to pass to ``model.apply`` (e.g. ``batch_stats``).
      apply_kwargs: keyword arguments for the model's ``__call__`` (e.g. ``train=False``).

    Returns:
      A :class:`SparseApply`: ``apply(x)`` returns the model output; ``apply.plan(x)`` says which
      layout each kernel uses for that input shape.

    Raises:
      TypeError: if ``model`` is neither a Linen nor an NNX module, or ``formats`` or ``stacked``
        has a bad type.
      ValueError: if an NNX model is in train mode (Dropout or BatchNorm; call
        ``model.eval()``), if ``formats`` names an unknown format or kernel, ``stacked`` matches
        nothing or gives an axis other than 0, the model does not match ``exported`` (shapes, or
        a kernel stacked in the model but not in ``stacked`` or the other way round), or a
        pruned weight sits in a layer the sparse path cannot run (for Linen, at the first call).

    >>> import jax, numpy as np, flax.linen as nn
    >>> from jaxprune.masks import compute_masks
    >>> model = nn.Dense(4)
    >>> params = model.init(jax.random.key(0), np.ones((1, 8)))['params']
    >>> masks = compute_masks(params, 1.0)
    >>> apply = sparse_apply(model, to_bcoo(params, masks))
    >>> x = np.ones((2, 8), np.float32)
    >>> dense = model.apply({'params': to_dense(to_bcoo(params, masks))}, x)
    >>> bool(np.allclose(apply(x), dense, rtol=1e-5, atol=1e-6)), apply.plan(x)
    (True, {'kernel': 'dense'})
    """
    kernels = {path: _entries_of(leaf) for path, leaf in bcoo_paths(exported) if is_bcoo(leaf)}
    _check_formats(formats, kernels)
    stacked_paths = _stacked_kernels(exported, stacked)
    known = Kernels({p: e.shape for p, e in kernels.items()}, stacked_paths)
    apply_kwargs = dict(apply_kwargs or {})
    if isinstance(model, nn.Module):
        tree, runner = linen_runner(model, exported, known, dict(variables or {}), apply_kwargs)
    elif isinstance(model, nnx.Module):
        if variables:
            raise ValueError("variables= is for Linen models; an NNX model carries its own state.")
        dtypes = {p: e.vals.dtype for p, e in kernels.items()}
        tree, runner = nnx_runner(model, exported, known, dtypes, apply_kwargs)
    else:
        raise TypeError(
            f"model must be a flax.linen Module or a flax.nnx Module, got {type(model).__name__}."
        )
    return SparseApply(tree, runner, kernels, stacked_paths, formats)
