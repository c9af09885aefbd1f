"""Tests of the demo's LeNet models: sizes, layer names, Linen/NNX agreement, dropout, errors."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune._tree import leaves_with_paths
from jaxprune.demo.models import (
    LeNet5,
    LeNet300100,
    NNXLeNet5,
    NNXLeNet300100,
    count_params,
    dense_layer_names,
)

MNIST = (28, 28, 1)


def init(model, shape=MNIST):
    return model.init(jax.random.key(0), jnp.zeros((1, *shape)))["params"]


def abstract(model, shape=MNIST):
    """Params shapes only (no computation), for tests of sizes and names."""
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))["params"]


def shapes(tree):
    return {path: tuple(leaf.shape) for path, leaf in leaves_with_paths(tree)}


def images(n, shape=MNIST, seed=1):
    return jax.random.uniform(jax.random.key(seed), (n, *shape))


def dense_count(sizes):
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


# --- sizes and layer names ------------------------------------------------------------------


def test_lenet5_is_caffes_431k_variant():
    params = abstract(LeNet5())
    assert shapes(params) == {
        "conv1/bias": (20,),
        "conv1/kernel": (5, 5, 1, 20),
        "conv2/bias": (50,),
        "conv2/kernel": (5, 5, 20, 50),
        "fc1/bias": (500,),
        "fc1/kernel": (800, 500),  # 4x4x50 after two valid 5x5 convs and two 2x2 pools
        "fc2/bias": (10,),
        "fc2/kernel": (500, 10),
    }
    assert count_params(params) == 431_080


def test_lenet300100_sizes():
    params = abstract(LeNet300100())
    assert shapes(params)["fc1/kernel"] == (784, 300)
    assert count_params(params) == dense_count([784, 300, 100, 10])


@pytest.mark.parametrize(
    ("linen", "nnx_model"),
    [
        # Small widths keep the test quick; the default widths share the same code path.
        (
            LeNet300100(hidden=(32, 16)),
            lambda: NNXLeNet300100(784, hidden=(32, 16), rngs=nnx.Rngs(0)),
        ),
        (
            LeNet5(channels=(4, 6), hidden=16),
            lambda: NNXLeNet5(MNIST, channels=(4, 6), hidden=16, rngs=nnx.Rngs(0)),
        ),
    ],
)
def test_nnx_models_match_linen_paths_and_outputs(linen, nnx_model):
    params = init(linen)
    model = nnx_model()
    state = nnx.state(model, nnx.Param)
    assert shapes(state) == shapes(params)
    # Same paths and shapes, so Linen weights load into the NNX model; the logits must agree.
    nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray, dict(params)))
    nnx.update(model, state)
    x = images(3)
    np.testing.assert_allclose(model(x), linen.apply({"params": params}, x), rtol=1e-5, atol=1e-5)


@settings(max_examples=4, deadline=None)
@given(
    h=st.integers(4, 12),
    w=st.integers(4, 12),
    hidden=st.lists(st.integers(1, 16), min_size=1, max_size=3),
)
def test_lenet300100_flattens_any_image_size(h, w, hidden):
    model = LeNet300100(hidden=tuple(hidden), num_classes=7)
    params = abstract(model, (h, w, 1))
    assert shapes(params)["fc1/kernel"] == (h * w, hidden[0])
    assert count_params(params) == dense_count([h * w, *hidden, 7])


def test_lenet5_on_8x8_digits_needs_same_padding():
    with pytest.raises(ValueError, match=r"LeNet5: image of shape \(8, 8\) is too small.*'SAME'"):
        abstract(LeNet5(), (8, 8, 1))
    with pytest.raises(ValueError, match=r"NNXLeNet5: image of shape \(8, 8, 1\) is too small"):
        NNXLeNet5((8, 8, 1), rngs=nnx.Rngs(0))
    params = abstract(LeNet5(padding="SAME"), (8, 8, 1))
    assert shapes(params)["fc1/kernel"] == (2 * 2 * 50, 500)  # 8 -> pool 4 -> pool 2


def test_shrunk_widths_build_smaller_models():
    params = abstract(LeNet5(channels=(6, 16), hidden=120))
    assert shapes(params)["conv2/kernel"] == (5, 5, 6, 16)
    assert shapes(params)["fc1/kernel"] == (4 * 4 * 16, 120)
    small = nnx.eval_shape(lambda: NNXLeNet300100(784, hidden=(30, 10), rngs=nnx.Rngs(0)))
    assert shapes(nnx.state(small, nnx.Param))["fc2/kernel"] == (30, 10)


# --- dropout --------------------------------------------------------------------------------


def test_linen_dropout_only_when_training():
    plain, dropped = (
        LeNet300100(hidden=(16, 8)),
        LeNet300100(hidden=(16, 8), dropout_rates=(0.0, 0.5, 0.5)),
    )
    params = init(plain)
    assert shapes(abstract(dropped)) == shapes(params)  # dropout adds no parameters
    x = images(4)
    ref = plain.apply({"params": params}, x)
    np.testing.assert_array_equal(dropped.apply({"params": params}, x), ref)
    a = dropped.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = dropped.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, ref) and not np.allclose(a, b)


def test_nnx_dropout_follows_train_and_eval_modes():
    model = NNXLeNet5(
        MNIST, channels=(2, 3), hidden=8, dropout_rates=(0.5, 0.5), rngs=nnx.Rngs(0, dropout=1)
    )
    x = images(2)
    assert not np.allclose(model(x), model(x))
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))


def test_models_without_dropout_hold_only_params():
    model = nnx.eval_shape(lambda: NNXLeNet300100(784, rngs=nnx.Rngs(0)))
    _, params = nnx.split(model, nnx.Param)  # would raise if RNG state were left over
    assert count_params(params) == dense_count([784, 300, 100, 10])


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: abstract(LeNet300100(dropout_rates=(0.5,))),
            r"dropout_rates has 1 entries, expected 3",
        ),
        (lambda: abstract(LeNet5(dropout_rates=(0.1, 1.0))), r"dropout_rates\[1\] \(fc2\) is 1.0"),
        (
            lambda: NNXLeNet300100(784, dropout_rates=(-0.1, 0, 0), rngs=nnx.Rngs(0)),
            r"NNXLeNet300100: dropout_rates\[0\] \(fc1\) is -0.1",
        ),
        (
            lambda: abstract(LeNet5(padding="FULL")),
            r"padding is 'FULL', expected 'VALID' or 'SAME'",
        ),
    ],
)
def test_bad_options_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_input_without_channel_axis_is_rejected():
    model = LeNet300100()
    params = abstract(model)
    with pytest.raises(ValueError, match=r"input x has shape \(2, 28, 28\).*x\[\.\.\., None\]"):
        jax.eval_shape(model.apply, {"params": params}, jnp.zeros((2, 28, 28)))


def test_dense_layer_names_match_the_param_paths():
    for model, params in [
        (LeNet300100(hidden=(5, 4, 3)), abstract(LeNet300100(hidden=(5, 4, 3)))),
        (LeNet5(), abstract(LeNet5())),
    ]:
        names = dense_layer_names(model)
        assert [p for p in shapes(params) if p.startswith("fc") and p.endswith("kernel")] == [
            f"{n}/kernel" for n in names
        ]
    assert dense_layer_names(NNXLeNet300100(64, hidden=(3,), rngs=nnx.Rngs(0))) == ("fc1", "fc2")
    with pytest.raises(TypeError, match="model is a dict, expected LeNet300100"):
        dense_layer_names({})


def test_count_params_counts_every_leaf():
    tree = {"a": np.zeros((3, 4)), "b": [np.zeros(5), np.zeros((2, 2, 2))]}
    assert count_params(tree) == 12 + 5 + 8


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(2, 7), st.integers(2, 7), st.integers(1, 3)),
    seed=st.integers(0, 2**16),
)
def test_max_pool_value_and_gradient_match_flax_max_pool(shape, seed):
    """The demo's pool equals nn.max_pool in value and gradient, odd sizes and ties included.

    Entries are drawn from four values, so most windows hold a tie: the gradient must go to the
    first largest entry (row order), as nn.max_pool's select-and-scatter sends it.
    """
    from jaxprune.demo.models import _max_pool_2x2

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.integers(0, 4, size=shape).astype(np.float32))
    g = rng.standard_normal((shape[0], shape[1] // 2, shape[2] // 2, shape[3])).astype(np.float32)

    def flax_pool(x):
        return nn.max_pool(x, (2, 2), strides=(2, 2))

    @jax.jit  # one compilation per shape for both pools: eager ops compiled one by one
    def both(x, g):
        return [(pool(x), jax.vjp(pool, x)[1](g)[0]) for pool in (_max_pool_2x2, flax_pool)]

    (value, got), (expected_value, expected) = both(x, g)
    assert value.shape == g.shape == expected_value.shape
    np.testing.assert_array_equal(value, expected_value)
    np.testing.assert_array_equal(got, expected)
