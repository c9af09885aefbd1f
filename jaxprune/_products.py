"""Every product sparse inference runs, reduced to ``x2d @ W2d`` on a 2-D view of the kernel.

A layer's product contracts some axes of its input with some axes of its kernel. Whatever the
layer (Dense, DenseGeneral's ``(features, heads, head_dim)`` query kernel, the ``(heads, head_dim,
features)`` out kernel, an Einsum, a convolution's patches, an Embed's tied output head), the
input is moved to ``(free..., contracted...)`` and flattened to ``x2d``, and the kernel is seen as
``W2d``: transposed to ``(contracted..., free...)`` and reshaped (:meth:`jaxprune._layouts.Entries.view`).
The functions here are the stand-ins a hook calls with the layer's arguments: each describes the
product as a :class:`Call` and hands it to ``step``, which runs it in the layout chosen for it.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxprune import _layouts


class Call(NamedTuple):
    """One product of a pruned kernel, as seen while tracing the model."""

    path: str  # the kernel's path in the exported tree
    use: str  # 'lookup', 'conv' or 'axes 0,1': the kernel axes contracted
    contract: tuple[int, ...]  # kernel axes contracted, in the order of the input's axes
    rows: int  # rows of x2d (batch x positions)
    run: Callable[[str, Any, jax.Array], jax.Array]  # run(format, layout, lhs)
    lhs: jax.ShapeDtypeStruct


# step(call, lhs, index): the layer's output; index picks the slice of a scan-stacked kernel.
Step = Callable[[Call, jax.Array, Any], jax.Array]


def _struct(x: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def product(
    path: str,
    shape: tuple[int, ...],
    lhs: jax.Array,
    lhs_axes: tuple[int, ...],
    contract: tuple[int, ...],
    dtype: Any,
    step: Step,
    index: Any,
) -> jax.Array:
    """``lhs`` contracted on ``lhs_axes`` with kernel axes ``contract``, as ``dot_general`` lays
    it out: the free axes of ``lhs`` in order, then the free axes of the kernel in order."""
    free_lhs = tuple(a for a in range(lhs.ndim) if a not in lhs_axes)
    free_kernel = tuple(d for a, d in enumerate(shape) if a not in contract)
    lead = tuple(lhs.shape[a] for a in free_lhs)

    def run(fmt: str, layout: Any, x: jax.Array) -> jax.Array:
        flat = x.transpose(*free_lhs, *lhs_axes).reshape(math.prod(lead), -1).astype(dtype)
        return _layouts.matmul(fmt, layout, flat).reshape(*lead, *free_kernel)

    use = "axes " + ",".join(map(str, contract))
    return step(Call(path, use, contract, math.prod(lead), run, _struct(lhs)), lhs, index)


def lookup(
    path: str, shape: tuple[int, ...], ids: jax.Array, dtype: Any, step: Step, index: Any
) -> jax.Array:
    """Rows ``ids`` of an embedding table of ``shape`` (``jnp.take(table, ids, axis=0)``)."""

    def run(fmt: str, layout: Any, x: jax.Array) -> jax.Array:
        return _layouts.lookup(fmt, layout, x, shape[1]).astype(dtype)

    return step(Call(path, "lookup", (0,), math.prod(ids.shape), run, _struct(ids)), ids, index)


def batch_error(path: str, dims: Any) -> ValueError:
    return ValueError(
        f"the layer of exported[{path!r}] contracts with batch dimensions ({dims}): a "
        "DenseGeneral with batch_dims (nnx.LinearGeneral with batch_axis, or an Einsum with a "
        "letter in both operands and the output) holds one kernel per batch entry, which the "
        "sparse path does not run. Export it dense: pass to_bcoo a `where` that excludes it, "
        "e.g. jaxprune.excluding(...)."
    )


def dot_general(path: str, shape: tuple[int, ...], step: Step, resolve: Callable) -> Callable:
    """A ``lax.dot_general`` stand-in for a layer whose kernel is the pruned one at ``path``."""

    def hook(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
        del precision
        (lc, rc), (lb, rb) = dimension_numbers
        if tuple(lb) or tuple(rb):
            raise batch_error(path, f"dot_general dimension numbers {dimension_numbers}")
        index = resolve(rhs)
        lhs_axes = tuple(int(a) % lhs.ndim for a in lc)
        contract = tuple(int(a) % len(shape) for a in rc)
        dtype = jnp.result_type(lhs, rhs)
        out = product(path, shape, lhs, lhs_axes, contract, dtype, step, index)
        return out if preferred_element_type is None else out.astype(preferred_element_type)

    return hook


def einsum_axes(path: str, equation: str, lhs_ndim: int, kernel_ndim: int) -> tuple:
    """``(lhs_axes, contract, perm)`` of an input-times-kernel einsum that is a matrix product.

    ``perm`` orders :func:`product`'s output (free input axes, then free kernel axes) as the
    equation's output. An ellipsis may stand for leading or inner input axes.

    Raises:
      ValueError: naming the kernel, for an equation that is not a matrix product (batch
        letters, letters summed within one operand, repeated letters, an ellipsis on the kernel).
    """
    eq = equation.replace(" ", "")
    ins, _, out = eq.partition("->")
    lhs, _, rhs = ins.partition(",")
    refuse = (
        f"the Einsum of exported[{path!r}] has equation {equation!r}, which is not a matrix "
        "product; the sparse path runs only equations whose letters are each in the input and "
        "the output, in the kernel and the output, or in the input and the kernel (contracted)"
    )
    if "..." in rhs:
        raise ValueError(f"{refuse}, with no ellipsis on the kernel. Export it dense.")
    if "..." in lhs:
        n = lhs_ndim - (len(lhs) - 3)
        fresh = "".join(c for c in string.ascii_letters if c not in eq)[: max(n, 0)]
        if "..." not in out and n:
            raise ValueError(f"{refuse}; its ellipsis axes are summed. Export it dense.")
        lhs, out = lhs.replace("...", fresh), out.replace("...", fresh)
    if len(lhs) != lhs_ndim or len(rhs) != kernel_ndim:
        raise ValueError(
            f"the Einsum of exported[{path!r}] has equation {equation!r} for an input of "
            f"{lhs_ndim} axes and a kernel of {kernel_ndim}."
        )
    if any(len(set(term)) != len(term) for term in (lhs, rhs, out)):
        raise ValueError(f"{refuse}; it repeats a letter (a diagonal). Export it dense.")
    batch = set(lhs) & set(rhs) & set(out)
    if batch:
        raise batch_error(path, f"einsum {equation!r}, letters {sorted(batch)}")
    summed = (set(lhs) ^ set(rhs)) - set(out)
    if summed:
        raise ValueError(f"{refuse}; letters {sorted(summed)} are summed within one operand.")
    if set(out) - set(lhs) - set(rhs):
        raise ValueError(f"{refuse}; its output has letters in neither operand.")
    contracted = [c for c in lhs if c in rhs]
    lhs_axes = tuple(lhs.index(c) for c in contracted)
    contract = tuple(rhs.index(c) for c in contracted)
    natural = [c for c in lhs if c not in rhs] + [c for c in rhs if c not in lhs]
    return lhs_axes, contract, tuple(natural.index(c) for c in out)


def einsum(path: str, shape: tuple[int, ...], step: Step, resolve: Callable) -> Callable:
    """A ``jnp.einsum(equation, x, kernel)`` stand-in for the pruned kernel at ``path``."""

    def hook(equation, lhs, rhs, precision=None, preferred_element_type=None, **_):
        del precision
        index = resolve(rhs)
        lhs_axes, contract, perm = einsum_axes(path, equation, lhs.ndim, len(shape))
        dtype = jnp.result_type(lhs, rhs)
        out = product(path, shape, lhs, lhs_axes, contract, dtype, step, index).transpose(perm)
        return out if preferred_element_type is None else out.astype(preferred_element_type)

    return hook


def _channel_last_dims(ndim: int) -> jax.lax.ConvDimensionNumbers:
    spatial = tuple(range(1, ndim - 1))
    return jax.lax.ConvDimensionNumbers(
        lhs_spec=(0, ndim - 1, *spatial),
        rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
        out_spec=(0, ndim - 1, *spatial),
    )


def conv(
    path: str,
    shape: tuple[int, ...],
    step: Step,
    resolve: Callable,
    own: Callable = jax.lax.conv_general_dilated,
) -> Callable:
    """A ``conv_general_dilated`` stand-in: patches times the sparse kernel matrix.

    Where the plan keeps the kernel dense, the layer's ``own`` convolution runs it (what the
    model runs unpruned, e.g. :func:`jaxprune.conv.fast_conv`), called as Flax calls it.
    """
    contract = tuple(range(len(shape) - 1))  # (kh, kw, cin) rows, cout columns

    def hook(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=None,
        rhs_dilation=None,
        dimension_numbers=None,
        feature_group_count=1,
        batch_group_count=1,
        precision=None,
        preferred_element_type=None,
        **_,
    ):
        del precision
        index = resolve(rhs)
        n_sp = lhs.ndim - 2
        dims = jax.lax.conv_dimension_numbers(lhs.shape, shape, dimension_numbers)
        if (
            feature_group_count != 1
            or batch_group_count != 1
            or dims != _channel_last_dims(lhs.ndim)
        ):
            raise ValueError(
                f"the layer of exported[{path!r}] is a grouped or non-channel-last convolution "
                f"(feature_group_count={feature_group_count}, dimension numbers {dims}); the "
                "sparse path runs only ungrouped channel-last convolutions."
            )
        lhs_dilation = tuple(lhs_dilation or (1,) * n_sp)
        rhs_dilation = tuple(rhs_dilation or (1,) * n_sp)
        strides = tuple(window_strides)
        dtype = jnp.result_type(lhs, rhs)

        def run(fmt: str, layout: Any, x: jax.Array) -> jax.Array:
            x = x.astype(dtype)
            if fmt == "dense":
                kernel = layout["w"].reshape(shape).astype(x.dtype)
                return own(
                    x,
                    kernel,
                    strides,
                    padding,
                    lhs_dilation=lhs_dilation,
                    rhs_dilation=rhs_dilation,
                    dimension_numbers=dimension_numbers,
                )
            patches = im2col(x, shape[:-2], strides, padding, lhs_dilation, rhs_dilation)
            flat = patches.reshape(-1, patches.shape[-1])
            return _layouts.matmul(fmt, layout, flat).reshape(*patches.shape[:-1], -1)

        out_shape = jax.eval_shape(
            lambda a: jax.lax.conv_general_dilated(
                a, jnp.zeros(shape, a.dtype), strides, padding, lhs_dilation, rhs_dilation, dims
            ),
            lhs,
        ).shape
        call = Call(path, "conv", contract, math.prod(out_shape[:-1]), run, _struct(lhs))
        out = step(call, lhs, index)
        return out if preferred_element_type is None else out.astype(preferred_element_type)

    return hook


def _padded(
    lhs: jax.Array,
    kernel_spatial: tuple[int, ...],
    strides: tuple[int, ...],
    padding: Any,
    lhs_dilation: tuple[int, ...],
    rhs_dilation: tuple[int, ...],
) -> tuple[jax.Array, tuple[int, ...]]:
    """The input padded (and dilated) as the convolution sees it, and the output's spatial shape."""
    in_sp = lhs.shape[1:-1]
    dilated_in = tuple((s - 1) * d + 1 for s, d in zip(in_sp, lhs_dilation, strict=True))
    dilated_k = tuple((k - 1) * d + 1 for k, d in zip(kernel_spatial, rhs_dilation, strict=True))
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(dilated_in, dilated_k, strides, padding)
    config = [(0, 0, 0)]
    config += [(lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation, strict=True)]
    config += [(0, 0, 0)]
    padded = jax.lax.pad(lhs, jnp.zeros((), lhs.dtype), config)
    out_sp = tuple(
        (p - k) // s + 1 for p, k, s in zip(padded.shape[1:-1], dilated_k, strides, strict=True)
    )
    return padded, out_sp


def _window(x: jax.Array, axis: int, offset: int, out: int, stride: int) -> jax.Array:
    """The ``out`` entries along ``axis`` that one kernel offset reads, ``stride`` apart."""
    return jax.lax.slice_in_dim(x, offset, offset + (out - 1) * stride + 1, stride, axis)


def im2col(
    lhs: jax.Array,
    kernel_spatial: tuple[int, ...],
    strides: tuple[int, ...],
    padding: Any,
    lhs_dilation: tuple[int, ...],
    rhs_dilation: tuple[int, ...],
) -> jax.Array:
    """Patches of a channel-last input, ordered ``(*kernel_spatial, C)`` to match an HWIO kernel.

    Returns ``(N, *out_spatial, prod(kernel_spatial) * C)``, so that its product with the kernel
    reshaped to ``(prod(kernel_spatial) * C, features)`` is ``lax.conv_general_dilated``.
    Built from strided slices (memory traffic only), one spatial axis at a time from the last:
    each pass stacks that axis's kernel offsets, so a 5x5 kernel costs two passes of five slices
    rather than one of 25 (LeNet-5's first layer: 0.6 ms against 3.1 ms on this project's CPUs).
    """
    x, out_sp = _padded(lhs, kernel_spatial, strides, padding, lhs_dilation, rhs_dilation)
    n = len(kernel_spatial)
    for axis in reversed(range(n)):  # (N, *out, k_axis, ..., k_last, C) after each pass
        offsets = range(0, kernel_spatial[axis] * rhs_dilation[axis], rhs_dilation[axis])
        pieces = [_window(x, 1 + axis, o, out_sp[axis], strides[axis]) for o in offsets]
        x = jnp.stack(pieces, axis=1 + n)
    return x.reshape(*x.shape[: 1 + n], -1)


def col2im(
    cols: jax.Array,
    lhs: jax.ShapeDtypeStruct,
    kernel_spatial: tuple[int, ...],
    strides: tuple[int, ...],
    padding: Any,
    lhs_dilation: tuple[int, ...],
    rhs_dilation: tuple[int, ...],
) -> jax.Array:
    """The transpose of :func:`im2col`: each patch entry added back where it was read from.

    ``cols`` is ``(N, *out_spatial, prod(kernel_spatial) * C)``; the result has ``lhs``'s shape.
    It transposes a one-pass construction of the same patches (all offsets stacked at once):
    XLA ran that transpose about 1.5x faster than the transpose of the axis-by-axis one (one
    standalone timing, LeNet-5's conv2).
    """
    n = len(kernel_spatial)

    def patches(x: jax.Array) -> jax.Array:
        x, out_sp = _padded(x, kernel_spatial, strides, padding, lhs_dilation, rhs_dilation)
        pieces = [x]
        for axis in range(n):
            offsets = range(0, kernel_spatial[axis] * rhs_dilation[axis], rhs_dilation[axis])
            pieces = [
                _window(p, 1 + axis, o, out_sp[axis], strides[axis])
                for p in pieces
                for o in offsets
            ]
        return jnp.stack(pieces, axis=-2).reshape(cols.shape)

    (out,) = jax.linear_transpose(patches, lhs)(cols)
    return out
