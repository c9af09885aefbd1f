"""A drop-in ``conv_general_dilated`` whose gradients (and optionally value) are matrix products.

On some CPUs XLA runs a channel-last forward convolution fast but the convolution it derives for
the kernel's gradient several times slower (LeNet-5's conv1 at about 2 GFLOP/s against 14-24
forward on one of this project's machines), and that gradient was most of a conv training step.
:func:`fast_conv` defines its own gradients (a ``jax.custom_vjp``):

- kernel: ``patches(x)^T @ dy``, the patches built from strided slices, one spatial axis at a
  time (``jaxprune._products.im2col``), so the work is one large matmul;
- input: ``dy @ W^T`` scattered back onto the input (``col2im``, the transpose of those slices).

Its value is XLA's convolution by default; ``forward='patches'`` computes it as
``patches(x) @ W`` instead, which is faster for some shapes (5x5 kernels, very few input
channels) and slower for others (3x3 kernels on 16-64 channels), so it is a choice, not the
default. LeNet-5's training step at batch 128 (``benchmarks/train_step.py``, four quiet runs on
this project's AMD EPYC over two sessions): ``forward='patches'`` 0.86-0.87x the plain step's time
and 1.02-1.07x torch's; the default forward about 1.02-1.07x plain on that machine (0.86-0.93x on
an earlier one). Split over 2 CPU devices (data parallel, as the demo trains), the patches step
ran 0.89x its one-device time and 0.91x torch's.

Values and both gradients equal ``lax.conv_general_dilated``'s up to float rounding. Pass it to a
Flax layer: ``nn.Conv(..., conv_general_dilated=fast_conv)`` (Linen) or
``nnx.Conv(..., conv_general_dilated=fast_conv)`` (NNX), or
``functools.partial(fast_conv, forward='patches')`` for the matmul forward.

What it supports: channel-last layouts (``NHWC``/``HWIO``/``NHWC`` and their 1-D and 3-D
analogues, which is what Flax passes), ``feature_group_count=1``, ``batch_group_count=1``, any
stride, padding (``'SAME'``, ``'VALID'``, explicit pairs) and input or kernel dilation. Anything
else raises a ``ValueError`` naming it rather than run with a wrong gradient. It is
reverse-mode only: ``jax.grad``, ``jax.vjp`` and ``jax.value_and_grad`` work (also under ``jit``
and ``vmap``), ``jax.jvp`` does not (a ``custom_vjp`` limit).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxprune._products import _channel_last_dims, col2im, im2col

__all__ = ["fast_conv"]


class _Conv(NamedTuple):
    """The static settings of one convolution (hashable: a ``custom_vjp`` non-diff argument)."""

    strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    precision: Any
    forward: str


def _patches(conv: _Conv, lhs: jax.Array, kernel_spatial: tuple[int, ...]) -> jax.Array:
    return im2col(
        lhs, kernel_spatial, conv.strides, conv.padding, conv.lhs_dilation, conv.rhs_dilation
    )


def _forward(conv: _Conv, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    if conv.forward == "patches":
        patches = _patches(conv, lhs, rhs.shape[:-2])
        w2d = rhs.reshape(-1, rhs.shape[-1])
        return jnp.matmul(patches, w2d, precision=conv.precision)
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        conv.strides,
        conv.padding,
        conv.lhs_dilation,
        conv.rhs_dilation,
        _channel_last_dims(lhs.ndim),
        precision=conv.precision,
    )


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(conv: _Conv, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    return _forward(conv, lhs, rhs)


def _conv_fwd(
    conv: _Conv, lhs: jax.Array, rhs: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _forward(conv, lhs, rhs), (lhs, rhs)


def _conv_bwd(
    conv: _Conv, residuals: tuple[jax.Array, jax.Array], dy: jax.Array
) -> tuple[jax.Array, jax.Array]:
    lhs, rhs = residuals
    # The patches are rebuilt rather than kept from the forward pass (under jit XLA computes them
    # once where both passes need them), so the residuals are the input, as for lax's own.
    patches = _patches(conv, lhs, rhs.shape[:-2])
    cols = patches.reshape(-1, patches.shape[-1])  # (N * positions, prod(kernel) * C)
    dy2d = dy.reshape(-1, dy.shape[-1])  # (N * positions, F)
    w2d = rhs.reshape(-1, rhs.shape[-1])  # (prod(kernel) * C, F)
    contract_rows = (((0,), (0,)), ((), ()))
    d_rhs = jax.lax.dot_general(cols, dy2d, contract_rows, precision=conv.precision)
    # Under jit, XLA drops the input gradient where nobody uses it (a first layer).
    d_cols = jnp.matmul(dy2d, w2d.T, precision=conv.precision).reshape(patches.shape)
    d_lhs = col2im(
        d_cols,
        jax.ShapeDtypeStruct(lhs.shape, lhs.dtype),
        rhs.shape[:-2],
        conv.strides,
        conv.padding,
        conv.lhs_dilation,
        conv.rhs_dilation,
    )
    return d_lhs, d_rhs.reshape(rhs.shape)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _spatial(name: str, value: Sequence[int] | None, n: int) -> tuple[int, ...]:
    if value is None:
        return (1,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n or any(v < 1 for v in value):
        raise ValueError(
            f"fast_conv: {name} is {value}, expected {n} positive integers (one per spatial axis)."
        )
    return value


def _padding(padding: Any, n: int) -> str | tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(
                f"fast_conv: padding is {padding!r}, expected 'SAME', 'SAME_LOWER', 'VALID' or "
                f"{n} (low, high) pairs."
            )
        return padding.upper()
    pairs = tuple(tuple(int(v) for v in pair) for pair in padding)
    if len(pairs) != n or any(len(pair) != 2 for pair in pairs):
        raise ValueError(
            f"fast_conv: padding is {padding!r}, expected a string or {n} (low, high) pairs."
        )
    return tuple((lo, hi) for lo, hi in pairs)


def fast_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
    *,
    forward: str = "conv",
) -> jax.Array:
    """``jax.lax.conv_general_dilated`` for channel-last inputs, with matmul gradients.

    Same arguments and values as ``lax.conv_general_dilated``; the gradients are computed
    differently (see the module docstring), and so, with ``forward='patches'``, is the value.

    Args:
      lhs: input, ``(N, *spatial, C)``.
      rhs: kernel, ``(*kernel_spatial, C, F)``.
      window_strides: one stride per spatial axis.
      padding: ``'SAME'``, ``'SAME_LOWER'``, ``'VALID'`` or one ``(low, high)`` pair per axis.
      lhs_dilation: input dilation per spatial axis, or ``None`` for none.
      rhs_dilation: kernel dilation per spatial axis, or ``None`` for none.
      dimension_numbers: must describe the channel-last layout (``('NHWC', 'HWIO', 'NHWC')`` in
        2-D, what Flax's ``Conv`` passes); ``None`` means lax's channel-first default and raises.
      feature_group_count: must be 1.
      batch_group_count: must be 1.
      precision: passed to the forward convolution and to the gradients' matmuls.
      preferred_element_type: must be ``None`` (the output has the inputs' dtype).
      out_sharding: must be ``None`` (``nnx.Conv`` passes it; sharded outputs are not supported).
      forward: how the value is computed. ``'conv'``: XLA's convolution. ``'patches'``: the
        input's patches times the kernel matrix, one matmul, as the gradients are. Which is faster
        depends on the shape: in one standalone timing on this project's CPUs ``'patches'`` ran 5x5 kernels (LeNet-5's,
        also with 64 channels) and 3x3 kernels on 3 input channels 1.2-1.4x faster than XLA, and
        3x3 kernels on 16-64 channels 1.5-2.6x slower. Pass it with ``functools.partial``.

    Returns:
      ``(N, *out_spatial, F)``, equal to ``lax.conv_general_dilated(...)``.

    Raises:
      ValueError: for a layout other than channel-last, grouped convolutions, a
        ``preferred_element_type`` or ``out_sharding``, inputs of different dtypes, malformed
        strides, dilations or padding, or an unknown ``forward``; the message names the argument.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> from jaxprune.conv import fast_conv
      >>> layer = nn.Conv(4, (3, 3), conv_general_dilated=fast_conv)
      >>> x = jnp.ones((2, 8, 8, 3))
      >>> params = layer.init(jax.random.key(0), x)["params"]
      >>> grads = jax.grad(lambda p: layer.apply({"params": p}, x).sum())(params)
      >>> grads["kernel"].shape
      (3, 3, 3, 4)
      >>> plain = nn.Conv(4, (3, 3))
      >>> expected = jax.grad(lambda p: plain.apply({"params": p}, x).sum())(params)
      >>> bool(jnp.allclose(grads["kernel"], expected["kernel"], rtol=1e-5))
      True
    """
    if forward not in ("conv", "patches"):
        raise ValueError(f"fast_conv: forward is {forward!r}, expected 'conv' or 'patches'.")
    if lhs.ndim < 3 or lhs.ndim != rhs.ndim:
        raise ValueError(
            f"fast_conv: lhs has shape {tuple(lhs.shape)} and rhs {tuple(rhs.shape)}, expected "
            "lhs (N, *spatial, C) and rhs (*kernel_spatial, C, F) with as many spatial axes."
        )
    if dimension_numbers is None:
        raise ValueError(
            "fast_conv: dimension_numbers is None, which lax reads as channel-first (NCHW); only "
            "channel-last layouts are supported: pass e.g. ('NHWC', 'HWIO', 'NHWC')."
        )
    dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if dims != _channel_last_dims(lhs.ndim):
        raise ValueError(
            f"fast_conv: dimension_numbers is {dimension_numbers!r} ({dims}), expected the "
            "channel-last layout (input N...C, kernel ...IO, output N...C) as Flax's Conv passes."
        )
    if feature_group_count != 1 or batch_group_count != 1:
        raise ValueError(
            f"fast_conv: feature_group_count={feature_group_count}, "
            f"batch_group_count={batch_group_count}; grouped convolutions are not supported, "
            "use lax.conv_general_dilated."
        )
    if preferred_element_type is not None:
        raise ValueError(
            f"fast_conv: preferred_element_type={preferred_element_type!r} is not supported; "
            "cast the inputs instead."
        )
    if out_sharding is not None:
        raise ValueError(
            f"fast_conv: out_sharding={out_sharding!r} is not supported; use "
            "lax.conv_general_dilated for sharded convolutions."
        )
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"fast_conv: lhs is {lhs.dtype} and rhs {rhs.dtype}, expected one dtype.")
    if lhs.shape[-1] != rhs.shape[-2]:
        raise ValueError(
            f"fast_conv: lhs has {lhs.shape[-1]} channels and rhs expects {rhs.shape[-2]} "
            f"(lhs {tuple(lhs.shape)}, rhs {tuple(rhs.shape)})."
        )
    n = lhs.ndim - 2
    conv = _Conv(
        _spatial("window_strides", window_strides, n),
        _padding(padding, n),
        _spatial("lhs_dilation", lhs_dilation, n),
        _spatial("rhs_dilation", rhs_dilation, n),
        precision,
        forward,
    )
    return _conv(conv, lhs, rhs)
