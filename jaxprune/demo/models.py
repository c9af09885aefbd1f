"""The demo's LeNet models, as Flax Linen modules and NNX equivalents.

Both styles name their layers the same way (``fc1``, ``fc2``, ... and ``conv1``, ``conv2``), so a
pruned leaf reads ``'fc1/kernel'`` whether the params come from ``variables['params']`` (Linen) or
``nnx.state(model, nnx.Param)`` (NNX).

Choices shared by every model here:

- Inputs are float32 images shaped ``(N, H, W, C)``; sizes other than MNIST's 28x28 work (the first
  dense layer's width is taken from the input), so the sklearn 8x8 digits run through them too.
- ``dropout_rates`` holds one rate per dense layer, applied to that layer's *input*, so that Han et
  al. 2015, Sec. 3.2's rescaling ``D_r = D_o * sqrt(C_r / C_o)`` of a layer's connections maps to
  one entry (see :func:`dense_layer_names`). ``None`` means no dropout, as in Caffe's LeNets.
- LeNet-5's convolutions run :func:`jaxprune.conv.fast_conv` with ``forward='patches'``: the same
  values and gradients as ``lax.conv_general_dilated``, each computed as one matmul of the
  input's patches, which made the CPU training step 0.86-0.87x the plain one
  (``benchmarks/train_step.py``); its max-pool has a written-out gradient for the same reason.
  The demo trains it with each batch split over 2 CPU devices (``devices.DATA_PARALLEL``).
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from jaxprune.conv import fast_conv

# LeNet-5's 5x5 convolutions run faster as patches times the kernel matrix (see fast_conv).
_conv = functools.partial(fast_conv, forward="patches")

__all__ = [
    "LeNet5",
    "LeNet300100",
    "NNXLeNet5",
    "NNXLeNet300100",
    "count_params",
    "dense_layer_names",
]


def _quarters(x: jax.Array) -> tuple[jax.Array, ...]:
    """The four entries of every 2x2 window (odd last row or column dropped), in row order."""
    h, w = x.shape[1:3]
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


def _pool_with_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    quarters = _quarters(x)
    top = functools.reduce(jnp.maximum, quarters)
    which = jnp.full(top.shape, 3, jnp.int8)
    for i in (2, 1, 0):  # the first entry equal to the max wins a tie
        which = jnp.where(quarters[i] == top, jnp.int8(i), which)
    return top, which


@jax.custom_vjp
def _max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool with stride 2 ('VALID': an odd last row or column is dropped).

    Same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``. The gradient goes to the first
    largest entry of each window (row order), as ``nn.max_pool``'s and torch's do; it is written
    out (the window's argmax kept as int8, then one select per entry) because XLA's own
    gradients of a max cost several passes on CPU: ``reduce_window``'s select-and-scatter made
    LeNet-5's training step about 1.7x slower, and a reshape-and-max about 5% slower than this.
    """
    return functools.reduce(jnp.maximum, _quarters(x))


def _pool_fwd(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, tuple[int, ...]]]:
    top, which = _pool_with_argmax(x)
    return top, (which, x.shape)


def _pool_bwd(residuals: tuple[jax.Array, tuple[int, ...]], g: jax.Array) -> tuple[jax.Array]:
    which, shape = residuals
    zero = jnp.zeros((), g.dtype)
    parts = [jnp.where(which == i, g, zero) for i in range(4)]
    rows = [jnp.stack(parts[:2], axis=3), jnp.stack(parts[2:], axis=3)]  # (N, H/2, W/2, 2, C)
    n, h2, w2, c = g.shape
    dx = jnp.stack(rows, axis=2).reshape(n, 2 * h2, 2 * w2, c)
    pad = [(0, 0), (0, shape[1] - 2 * h2), (0, shape[2] - 2 * w2), (0, 0)]
    return (jnp.pad(dx, pad),)


_max_pool_2x2.defvjp(_pool_fwd, _pool_bwd)


def _check_rates(rates: Sequence[float] | None, n_dense: int, model: str) -> tuple[float, ...]:
    if rates is None:
        return (0.0,) * n_dense
    rates = tuple(float(r) for r in rates)
    if len(rates) != n_dense:
        raise ValueError(
            f"{model}: dropout_rates has {len(rates)} entries, expected {n_dense} (one per dense "
            f"layer {', '.join(f'fc{i + 1}' for i in range(n_dense))}), or None for no dropout."
        )
    for i, r in enumerate(rates):
        if not 0.0 <= r < 1.0:
            raise ValueError(
                f"{model}: dropout_rates[{i}] (fc{i + 1}) is {r}, expected 0 <= rate < 1."
            )
    return rates


def _check_images(x: jax.Array, model: str) -> None:
    if x.ndim != 4:
        raise ValueError(
            f"{model}: input x has shape {tuple(x.shape)}, expected images shaped (N, H, W, C); "
            "add the channel axis with x[..., None]."
        )


def _conv_out(size: int, kernel: int, padding: str) -> int:
    return size if padding == "SAME" else size - kernel + 1


def _lenet5_flat_size(
    image_shape: Sequence[int], channels: Sequence[int], padding: str, model: str
) -> int:
    """Width of the features after conv-pool-conv-pool; raises if the image is too small."""
    if padding not in ("VALID", "SAME"):
        raise ValueError(f"{model}: padding is {padding!r}, expected 'VALID' or 'SAME'.")
    h, w = int(image_shape[0]), int(image_shape[1])
    for stage in (1, 2):
        h, w = _conv_out(h, 5, padding), _conv_out(w, 5, padding)
        if h < 2 or w < 2:
            raise ValueError(
                f"{model}: image of shape {tuple(image_shape)} is too small for conv{stage} (5x5) "
                f"with padding={padding!r} followed by a 2x2 max-pool; use padding='SAME' for "
                "small images such as the 8x8 digits."
            )
        h, w = h // 2, w // 2
    return h * w * int(channels[1])


def _nnx_dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
    # Without dropout, hold no RNG stream: the model's state is then only its Params.
    return nnx.Dropout(rate, rngs=rngs if rate > 0.0 else None)


class LeNet300100(nn.Module):
    """LeNet-300-100: a 784-300-100-10 ReLU perceptron (Linen), flattening its input images.

    Attributes:
      hidden: widths of the hidden dense layers, ``(300, 100)`` in the paper; smaller widths build
        a shrunk model.
      num_classes: number of output logits.
      dropout_rates: one dropout rate per dense layer (``len(hidden) + 1`` entries) applied to that
        layer's input during training, or ``None`` for no dropout.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = LeNet300100()
      >>> params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
      >>> count_params(params)
      266610
      >>> model.apply({"params": params}, jnp.zeros((2, 28, 28, 1))).shape
      (2, 10)
    """

    hidden: Sequence[int] = (300, 100)
    num_classes: int = 10
    dropout_rates: Sequence[float] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits for images ``x`` of shape ``(N, H, W, C)``; ``train`` turns dropout on.

        With ``train=True`` and non-zero rates, pass ``rngs={'dropout': key}`` to ``apply``.
        """
        _check_images(x, "LeNet300100")
        widths = (*self.hidden, self.num_classes)
        rates = _check_rates(self.dropout_rates, len(widths), "LeNet300100")
        x = x.reshape((x.shape[0], -1))
        for i, (width, rate) in enumerate(zip(widths, rates, strict=True)):
            if rate > 0.0:
                x = nn.Dropout(rate, deterministic=not train)(x)
            x = nn.Dense(width, name=f"fc{i + 1}")(x)
            if i < len(self.hidden):
                x = jax.nn.relu(x)
        return x


class LeNet5(nn.Module):
    """LeNet-5 in Caffe's variant used by Han et al. 2015 (Linen): 431,080 parameters on MNIST.

    conv1 (20 5x5) - max-pool 2x2 - conv2 (50 5x5) - max-pool 2x2 - fc1 (500, ReLU) - fc2 (10).
    As in Caffe's LeNet there is no nonlinearity after the convolutions.

    Attributes:
      channels: output channels of conv1 and conv2, ``(20, 50)`` in the paper.
      hidden: width of fc1, 500 in the paper.
      num_classes: number of output logits.
      padding: ``'VALID'`` (Caffe's, for 28x28 inputs) or ``'SAME'`` (needed for small images such
        as the 8x8 digits, which VALID 5x5 convolutions would shrink to nothing).
      dropout_rates: two rates, for the inputs of fc1 and fc2, or ``None`` for no dropout.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = LeNet5()
      >>> params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
      >>> count_params(params)
      431080
      >>> small = LeNet5(padding="SAME")
      >>> p8 = jax.jit(small.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
      >>> jax.jit(small.apply)({"params": p8}, jnp.zeros((3, 8, 8, 1))).shape
      (3, 10)
    """

    channels: Sequence[int] = (20, 50)
    hidden: int = 500
    num_classes: int = 10
    padding: str = "VALID"
    dropout_rates: Sequence[float] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits for images ``x`` of shape ``(N, H, W, C)``; ``train`` turns dropout on.

        With ``train=True`` and non-zero rates, pass ``rngs={'dropout': key}`` to ``apply``.
        """
        _check_images(x, "LeNet5")
        _lenet5_flat_size(x.shape[1:3], self.channels, self.padding, "LeNet5")
        rates = _check_rates(self.dropout_rates, 2, "LeNet5")
        for i, ch in enumerate(self.channels):
            conv = nn.Conv(
                ch,
                (5, 5),
                padding=self.padding,
                conv_general_dilated=_conv,
                name=f"conv{i + 1}",
            )
            x = conv(x)
            x = _max_pool_2x2(x)
        x = x.reshape((x.shape[0], -1))
        for i, (width, rate) in enumerate(zip((self.hidden, self.num_classes), rates, strict=True)):
            if rate > 0.0:
                x = nn.Dropout(rate, deterministic=not train)(x)
            x = nn.Dense(width, name=f"fc{i + 1}")(x)
            if i == 0:
                x = jax.nn.relu(x)
        return x


class NNXLeNet300100(nnx.Module):
    """LeNet-300-100 as an NNX module; same layer names and maths as :class:`LeNet300100`.

    Dropout runs while the module is in training mode (``model.train()``, the default after
    construction) and is off after ``model.eval()``.

    Args:
      in_features: flattened input size, ``H * W * C`` (784 for MNIST, 64 for the 8x8 digits).
      hidden: widths of the hidden dense layers.
      num_classes: number of output logits.
      dropout_rates: one rate per dense layer (input side), or ``None`` for no dropout.
      rngs: the NNX random streams (``params``, and ``dropout`` when rates are non-zero).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = NNXLeNet300100(in_features=784, rngs=nnx.Rngs(0))
      >>> count_params(nnx.state(model, nnx.Param))
      266610
      >>> model(jnp.zeros((2, 28, 28, 1))).shape
      (2, 10)
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (300, 100),
        num_classes: int = 10,
        dropout_rates: Sequence[float] | None = None,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        widths = (*hidden, num_classes)
        rates = _check_rates(dropout_rates, len(widths), "NNXLeNet300100")
        self.n_dense = len(widths)
        sizes = (in_features, *widths)
        for i in range(self.n_dense):
            # Attribute names, not a list, so that paths read 'fc1/kernel' as in Linen.
            setattr(self, f"fc{i + 1}", nnx.Linear(sizes[i], sizes[i + 1], rngs=rngs))
            setattr(self, f"drop{i + 1}", _nnx_dropout(rates[i], rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits for images ``x`` of shape ``(N, H, W, C)``."""
        _check_images(x, "NNXLeNet300100")
        x = x.reshape((x.shape[0], -1))
        for i in range(self.n_dense):
            x = getattr(self, f"drop{i + 1}")(x)
            x = getattr(self, f"fc{i + 1}")(x)
            if i < self.n_dense - 1:
                x = jax.nn.relu(x)
        return x


class NNXLeNet5(nnx.Module):
    """LeNet-5 (Caffe's variant) as an NNX module; same layer names and maths as :class:`LeNet5`.

    Args:
      image_shape: ``(H, W, C)`` of the inputs, used to size fc1 (``(28, 28, 1)`` for MNIST).
      channels: output channels of conv1 and conv2.
      hidden: width of fc1.
      num_classes: number of output logits.
      padding: ``'VALID'`` or ``'SAME'`` (see :class:`LeNet5`).
      dropout_rates: two rates, for the inputs of fc1 and fc2, or ``None``.
      rngs: the NNX random streams.

    Raises:
      ValueError: if the image is too small for the chosen padding, or the rates are malformed.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = NNXLeNet5(rngs=nnx.Rngs(0))
      >>> count_params(nnx.state(model, nnx.Param))
      431080
      >>> model(jnp.zeros((2, 28, 28, 1))).shape
      (2, 10)
    """

    def __init__(
        self,
        image_shape: Sequence[int] = (28, 28, 1),
        channels: Sequence[int] = (20, 50),
        hidden: int = 500,
        num_classes: int = 10,
        padding: str = "VALID",
        dropout_rates: Sequence[float] | None = None,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        flat = _lenet5_flat_size(image_shape, channels, padding, "NNXLeNet5")
        rates = _check_rates(dropout_rates, 2, "NNXLeNet5")
        conv: dict[str, Any] = dict(
            kernel_size=(5, 5), padding=padding, conv_general_dilated=_conv, rngs=rngs
        )
        self.conv1 = nnx.Conv(int(image_shape[2]), channels[0], **conv)
        self.conv2 = nnx.Conv(channels[0], channels[1], **conv)
        self.drop1 = _nnx_dropout(rates[0], rngs)
        self.fc1 = nnx.Linear(flat, hidden, rngs=rngs)
        self.drop2 = _nnx_dropout(rates[1], rngs)
        self.fc2 = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits for images ``x`` of shape ``(N, H, W, C)``."""
        _check_images(x, "NNXLeNet5")
        x = _max_pool_2x2(self.conv1(x))
        x = _max_pool_2x2(self.conv2(x))
        x = x.reshape((x.shape[0], -1))
        x = jax.nn.relu(self.fc1(self.drop1(x)))
        return self.fc2(self.drop2(x))


def dense_layer_names(model: nn.Module | nnx.Module) -> tuple[str, ...]:
    """Names of a model's dense layers, in the order its ``dropout_rates`` refer to them.

    Args:
      model: one of this module's four models.

    Returns:
      ``('fc1', 'fc2', ...)``; the kernel of layer ``name`` sits at path ``f'{name}/kernel'``.

    Raises:
      TypeError: if ``model`` is not one of this module's models.

    Example:
      >>> dense_layer_names(LeNet300100(hidden=(30, 20, 10)))
      ('fc1', 'fc2', 'fc3', 'fc4')
      >>> dense_layer_names(LeNet5())
      ('fc1', 'fc2')
    """
    if isinstance(model, LeNet300100):
        n = len(model.hidden) + 1
    elif isinstance(model, NNXLeNet300100):
        n = model.n_dense
    elif isinstance(model, LeNet5 | NNXLeNet5):
        n = 2
    else:
        raise TypeError(
            f"dense_layer_names: model is a {type(model).__name__}, expected LeNet300100, LeNet5, "
            "NNXLeNet300100 or NNXLeNet5."
        )
    return tuple(f"fc{i + 1}" for i in range(n))


def count_params(params: object) -> int:
    """Total number of scalar entries over the array leaves of a params tree.

    Args:
      params: a Linen params dict or an NNX state (any pytree of arrays); the
        ``jax.ShapeDtypeStruct`` leaves of ``jax.eval_shape(model.init, ...)`` count too, so a
        model can be sized without allocating it.

    Returns:
      The sum of ``leaf.size`` over all leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> count_params({"fc1": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}})
      16
    """
    return int(
        sum(getattr(leaf, "size", None) or np.size(leaf) for leaf in jax.tree.leaves(params))
    )
