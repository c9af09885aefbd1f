"""Tests of jaxprune.conv.fast_conv: values and gradients equal lax's, in layers, and its errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jaxprune.conv import fast_conv
from jaxprune.demo.models import LeNet5, NNXLeNet5
from jaxprune.masks import apply_masks, masks_for_sparsity
from jaxprune.transform import keep_pruned

PATCHES = functools.partial(fast_conv, forward="patches")
CHANNEL_LAST = {
    1: ("NWC", "WIO", "NWC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


def value_and_grads(conv, x, w, dy, **kwargs):
    """The convolution's output and its input and kernel gradients for cotangent ``dy``."""
    y, vjp = jax.vjp(lambda a, b: conv(a, b, **kwargs), x, w)
    return (y, *vjp(dy))


def explicit_conv(
    x, w, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None
):
    """``lax.conv_general_dilated`` (channel-last) as ``lax.pad`` (dilation, padding) + VALID.

    The gradient reference: on jax 0.10.2 lax's own input gradient is wrong where a padding is
    larger than the dilated kernel's extent minus one (its transposed convolution pads by a
    negative amount; the results were garbage such as 1e28 or NaN, or XLA's compiler aborted), a
    case this property test found. Its value equals lax's, which the test checks too.
    """
    rank = x.ndim - 2
    lhs_dilation = tuple(lhs_dilation or (1,) * rank)
    rhs_dilation = tuple(rhs_dilation or (1,) * rank)
    dilated_in = [(s - 1) * d + 1 for s, d in zip(x.shape[1:-1], lhs_dilation, strict=True)]
    dilated_k = [(k - 1) * d + 1 for k, d in zip(w.shape[:-2], rhs_dilation, strict=True)]
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(dilated_in, dilated_k, window_strides, padding)
    config = [
        (0, 0, 0),
        *((lo, hi, d - 1) for (lo, hi), d in zip(padding, lhs_dilation, strict=True)),
        (0, 0, 0),
    ]
    padded = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
    return jax.lax.conv_general_dilated(
        padded,
        w,
        window_strides,
        "VALID",
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
    )


def assert_same_as_lax(x, w, jit=True, **kwargs):
    """fast_conv's value equals lax.conv_general_dilated's, and its value and both gradients
    :func:`explicit_conv`'s, for both forwards.

    Jitted by default, all in one compilation: a tenth of the time of running the custom VJP's
    many small ops eagerly, each compiled for its own shape.
    """
    out = jax.eval_shape(functools.partial(jax.lax.conv_general_dilated, **kwargs), x, w)
    dy = np.random.default_rng(7).standard_normal(out.shape, np.float32)

    def both(x, w, dy):
        lax_value = jax.lax.conv_general_dilated(x, w, **kwargs)
        return lax_value, *(
            value_and_grads(conv, x, w, dy, **kwargs)
            for conv in (explicit_conv, fast_conv, PATCHES)
        )

    lax_value, expected, *gots = (jax.jit(both) if jit else both)(x, w, dy)
    scale = float(jnp.max(jnp.abs(lax_value))) + 1.0
    np.testing.assert_allclose(expected[0], lax_value, rtol=1e-4, atol=1e-5 * scale)
    for forward, got in zip(("conv", "patches"), gots, strict=True):
        for name, g, e in zip(("value", "d_input", "d_kernel"), got, expected, strict=True):
            assert g.shape == e.shape and g.dtype == e.dtype, (forward, name)
            scale = float(jnp.max(jnp.abs(e))) + 1.0
            np.testing.assert_allclose(
                g, e, rtol=1e-4, atol=1e-5 * scale, err_msg=f"forward={forward}: {name}"
            )


@st.composite
def conv_cases(draw, rank=2):
    sizes = st.integers(1, 3)
    n, c, f = draw(sizes), draw(sizes), draw(sizes)
    spatial = tuple(draw(st.integers(1, 9)) for _ in range(rank))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(rank))
    strides = tuple(draw(sizes) for _ in range(rank))
    lhs_dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    rhs_dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    padding = draw(
        st.one_of(
            st.sampled_from(["SAME", "VALID", "SAME_LOWER"]),
            st.tuples(*[st.tuples(st.integers(0, 3), st.integers(0, 3)) for _ in range(rank)]),
        )
    )
    if isinstance(padding, str):  # lax takes string padding only without input dilation
        lhs_dilation = (1,) * rank
    dilated_in = [(s - 1) * d + 1 for s, d in zip(spatial, lhs_dilation, strict=True)]
    dilated_k = [(k - 1) * d + 1 for k, d in zip(kernel, rhs_dilation, strict=True)]
    pads = (
        jax.lax.padtype_to_pads(dilated_in, dilated_k, strides, padding)
        if isinstance(padding, str)
        else padding
    )
    assume(
        all(i + lo + hi >= k for i, (lo, hi), k in zip(dilated_in, pads, dilated_k, strict=True))
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal((n, *spatial, c), np.float32)
    w = rng.standard_normal((*kernel, c, f), np.float32)
    options = dict(
        window_strides=strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=CHANNEL_LAST[rank],
    )
    return x, w, options


# Every example compiles its own shapes (about 0.5-0.7 s each here, jitted).
@settings(max_examples=25)
@given(conv_cases())
def test_value_and_gradients_equal_lax_2d(case):
    x, w, options = case
    assert_same_as_lax(x, w, **options)


@pytest.mark.parametrize("rank", [1, 3])
@settings(max_examples=12)
@given(data=st.data())
def test_value_and_gradients_equal_lax_1d_3d(rank, data):
    x, w, options = data.draw(conv_cases(rank))
    assert_same_as_lax(x, w, **options)


def test_padding_wider_than_the_kernel():
    # The case the property found: lax's own input gradient is wrong here (explicit_conv).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 7, 1), np.float32)
    w = rng.standard_normal((2, 2, 1, 2), np.float32)
    options = dict(window_strides=(1, 1), padding=((3, 0), (3, 0)), lhs_dilation=(1, 2))
    assert_same_as_lax(x, w, dimension_numbers=CHANNEL_LAST[2], **options)


def test_flax_dimension_numbers_object():
    # Flax passes a ConvDimensionNumbers, not strings.
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, CHANNEL_LAST[2])
    # Eager as well: the custom VJP also runs op by op outside jit.
    for jit in (True, False):
        assert_same_as_lax(
            x, w, jit=jit, window_strides=(2, 1), padding="SAME", dimension_numbers=dims
        )


def test_jit_compiles_once_and_vmap():
    x = jax.random.normal(jax.random.key(0), (4, 2, 9, 9, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 5))

    def loss(conv, x, w):
        y = conv(x, w, (1, 2), "SAME", dimension_numbers=CHANNEL_LAST[2])
        return jnp.sum(jnp.sin(y))

    grad = jax.grad(loss, argnums=(1, 2))
    fast = jax.jit(jax.vmap(lambda x, w: grad(fast_conv, x, w), in_axes=(0, None)))
    plain = jax.vmap(lambda x, w: grad(jax.lax.conv_general_dilated, x, w), in_axes=(0, None))
    got, expected = fast(x, w), plain(x, w)
    fast(x + 1.0, w)
    assert fast._cache_size() == 1
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_inside_linen_conv():
    x = jax.random.normal(jax.random.key(0), (3, 10, 10, 2))
    fast = nn.Conv(
        4, (3, 3), strides=(2, 2), kernel_dilation=(1, 2), conv_general_dilated=fast_conv
    )
    plain = nn.Conv(4, (3, 3), strides=(2, 2), kernel_dilation=(1, 2))
    params = plain.init(jax.random.key(1), x)["params"]

    def grads(layer):
        return jax.grad(lambda p, x: jnp.sum(layer.apply({"params": p}, x) ** 2), (0, 1))(params, x)

    for g, e in zip(jax.tree.leaves(grads(fast)), jax.tree.leaves(grads(plain)), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_inside_nnx_conv():
    x = jax.random.normal(jax.random.key(0), (3, 10, 10, 2))
    fast = nnx.Conv(2, 4, (3, 3), padding="VALID", conv_general_dilated=fast_conv, rngs=nnx.Rngs(0))
    plain = nnx.Conv(2, 4, (3, 3), padding="VALID", rngs=nnx.Rngs(0))

    def grads(layer):
        return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)

    for g, e in zip(jax.tree.leaves(grads(fast)), jax.tree.leaves(grads(plain)), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("style", ["linen", "nnx"])
def test_pruned_conv_training_keeps_zeros(style):
    """One keep_pruned step of the demo LeNet-5 (which uses fast_conv) keeps pruned kernels zero."""
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 1))
    labels = jnp.arange(8) % 10
    if style == "linen":
        model = LeNet5(padding="SAME")
        params = jax.jit(model.init)(jax.random.key(1), x)["params"]  # eager init: op by op

        def logits(p):
            return model.apply({"params": p}, x)
    else:
        nnx_model = NNXLeNet5(image_shape=(8, 8, 1), padding="SAME", rngs=nnx.Rngs(1))
        graph, params = nnx.split(nnx_model, nnx.Param)

        def logits(p):
            return nnx.merge(graph, p)(x)

    masks = masks_for_sparsity(params, 0.5)
    params = apply_masks(params, masks)
    tx = keep_pruned(optax.sgd(0.1, momentum=0.9), masks)

    @jax.jit
    def step(p, state):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(logits(p), labels).mean()

        updates, state = tx.update(jax.grad(loss)(p), state, p)
        return optax.apply_updates(p, updates)

    new = step(params, tx.init(params))
    for layer in ("conv1", "conv2"):
        kept = np.asarray(masks[layer]["kernel"])
        w, w0 = np.asarray(new[layer]["kernel"]), np.asarray(params[layer]["kernel"])
        assert 0 < kept.sum() < kept.size
        assert np.all(w[~kept] == 0.0)
        assert np.any(w[kept] != w0[kept])  # the survivors did train


X = jnp.zeros((1, 6, 6, 2))
W = jnp.zeros((3, 3, 2, 4))
NHWC = CHANNEL_LAST[2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(dimension_numbers=None), "dimension_numbers is None.*channel-first"),
        (dict(dimension_numbers=("NCHW", "OIHW", "NCHW")), "expected the channel-last layout"),
        (dict(feature_group_count=2), "feature_group_count=2.*grouped"),
        (dict(batch_group_count=2), "batch_group_count=2.*grouped"),
        (dict(preferred_element_type=jnp.float32), "preferred_element_type"),
        (dict(out_sharding="x"), "out_sharding"),
        (dict(window_strides=(1,)), "window_strides is \\(1,\\), expected 2 positive"),
        (dict(rhs_dilation=(0, 1)), "rhs_dilation is \\(0, 1\\)"),
        (dict(padding="CIRCULAR"), "padding is 'CIRCULAR'"),
        (dict(padding=((1, 1),)), "expected a string or 2 \\(low, high\\) pairs"),
        (dict(forward="im2col"), "forward is 'im2col', expected 'conv' or 'patches'"),
    ],
)
def test_unsupported_raises(kwargs, match):
    options = {"window_strides": (1, 1), "padding": "SAME", "dimension_numbers": NHWC, **kwargs}
    with pytest.raises(ValueError, match=match):
        fast_conv(X, W, **options)


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="lhs is float32 and rhs bfloat16"):
        fast_conv(X, W.astype(jnp.bfloat16), (1, 1), "SAME", dimension_numbers=NHWC)
    with pytest.raises(ValueError, match="lhs has 2 channels and rhs expects 3"):
        fast_conv(X, jnp.zeros((3, 3, 3, 4)), (1, 1), "SAME", dimension_numbers=NHWC)
    with pytest.raises(ValueError, match="as many spatial axes"):
        fast_conv(X, jnp.zeros((3, 2, 4)), (1, 1), "SAME", dimension_numbers=NHWC)
