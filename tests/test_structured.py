"""Tests for jaxprune.structured: dead-unit removal (shrink) and neuron pruning."""

import copy
import importlib.util
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import count_compiles
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune.demo.models import LeNet5, LeNet300100, NNXLeNet300100
from jaxprune.masks import apply_masks
from jaxprune.rounds import RoundsState, prune_and_retrain
from jaxprune.structured import neuron_masks, shrink
from jaxprune.transform import keep_pruned, prune_gradients

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _identity(x):
    return x


def _relu(x):
    return np.maximum(x, 0)


def _mlp_apply(params, x, names, act=_relu):
    """A plain dense chain in NumPy (no model class, no compilation per shape)."""
    for i, name in enumerate(names):
        x = x @ np.asarray(params[name]["kernel"]) + np.asarray(params[name]["bias"])
        if i < len(names) - 1:
            x = act(x)
    return x


def _hand_mlp():
    """4 -> 5 -> 4 -> 2 with known dead units (see the comments)."""
    rng = np.random.default_rng(0)
    k1 = rng.normal(size=(4, 5)).astype(np.float32)
    k2 = rng.normal(size=(5, 4)).astype(np.float32)
    k3 = rng.normal(size=(4, 2)).astype(np.float32)
    b1 = np.array([0.1, 0.2, -0.3, -0.5, 0.4], np.float32)
    b2 = np.array([0.3, -0.2, 0.1, 0.2], np.float32)
    b3 = np.array([0.05, -0.05], np.float32)
    k2[1, :] = 0.0  # fc1 unit 1: no outgoing connections -> dropped
    k1[:, 3] = 0.0  # fc1 unit 3: no inputs, relu(-0.5) = 0 -> dropped, nothing to fold
    k3[2, :] = 0.0  # fc2 unit 2: no outgoing connections -> dropped
    return {
        "fc1": {"kernel": k1, "bias": b1},
        "fc2": {"kernel": k2, "bias": b2},
        "fc3": {"kernel": k3, "bias": b3},
    }


NAMES = ["fc1", "fc2", "fc3"]


def test_hand_built_mlp_known_dead_units():
    params = _hand_mlp()
    out = shrink(params, layers=NAMES)
    assert out.widths == (3, 3, 2)
    keep1, keep2 = [0, 2, 4], [0, 1, 3]
    np.testing.assert_array_equal(out.params["fc1"]["kernel"], params["fc1"]["kernel"][:, keep1])
    np.testing.assert_array_equal(out.params["fc1"]["bias"], params["fc1"]["bias"][keep1])
    np.testing.assert_array_equal(
        out.params["fc2"]["kernel"], params["fc2"]["kernel"][np.ix_(keep1, keep2)]
    )
    np.testing.assert_array_equal(out.params["fc3"]["kernel"], params["fc3"]["kernel"][keep2])
    np.testing.assert_array_equal(out.params["fc3"]["bias"], params["fc3"]["bias"])
    x = np.random.default_rng(1).normal(size=(7, 4)).astype(np.float32)
    np.testing.assert_allclose(
        _mlp_apply(out.params, x, NAMES), _mlp_apply(params, x, NAMES), atol=1e-5
    )
    assert out.report.hidden_before == 9 and out.report.hidden_after == 6
    assert [r.units_after for r in out.report.rows] == [3, 3, 2]


def test_cascading_removal_in_both_directions():
    params = _hand_mlp()
    params["fc2"]["kernel"][[0, 2, 4], 0] = 0.0  # fc2 unit 0 now fed only by fc1 unit 3 (dead)
    params["fc2"]["bias"][0] = -1.0  # relu(-1) = 0: once fc1 unit 3 goes, fc2 unit 0 is zero
    params["fc2"]["kernel"][4, [1, 3]] = 0.0  # fc1 unit 4 feeds only fc2 unit 2 (no outputs)
    out = shrink(params, layers=NAMES)
    # fc1 keeps units 0 and 2; fc2 keeps units 1 and 3. Unit 0 of fc2 dies only after unit 3 of
    # fc1 is removed, unit 4 of fc1 only after unit 2 of fc2 is: one pass would not reach this.
    assert out.widths == (2, 2, 2)
    np.testing.assert_array_equal(out.params["fc1"]["bias"], params["fc1"]["bias"][[0, 2]])
    np.testing.assert_array_equal(out.params["fc2"]["bias"], params["fc2"]["bias"][[1, 3]])
    x = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(
        _mlp_apply(out.params, x, NAMES), _mlp_apply(params, x, NAMES), atol=1e-5
    )
    again = shrink(out.params, layers=NAMES)
    assert again.widths == out.widths


def test_bias_folding_of_unit_without_inputs():
    params = _hand_mlp()
    params["fc1"]["kernel"][:, 0] = 0.0
    params["fc1"]["bias"][0] = 2.0  # relu(2) = 2: a constant output that matters downstream
    out = shrink(params, layers=NAMES)
    assert out.widths == (2, 3, 2)
    want = params["fc2"]["bias"] + 2.0 * params["fc2"]["kernel"][0]
    np.testing.assert_allclose(out.params["fc2"]["bias"], want[[0, 1, 3]], rtol=1e-6)
    x = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)
    np.testing.assert_allclose(
        _mlp_apply(out.params, x, NAMES), _mlp_apply(params, x, NAMES), atol=1e-5
    )


def test_folding_uses_the_given_activation():
    params = _hand_mlp()
    params["fc1"]["kernel"][:, 0] = 0.0
    params["fc1"]["bias"][0] = -2.0
    # With tanh the constant is tanh(-2) (relu would give 0 and drop the unit without folding).
    out = shrink(params, layers=NAMES, activation=jnp.tanh)
    x = np.random.default_rng(4).normal(size=(6, 4)).astype(np.float32)
    np.testing.assert_allclose(
        _mlp_apply(out.params, x, NAMES, np.tanh),
        _mlp_apply(params, x, NAMES, np.tanh),
        atol=1e-5,
    )
    # Unit 3 (no inputs, bias -0.5) is folded too under tanh, unit 1 still dropped.
    assert out.widths == (2, 3, 2)


def test_unit_without_inputs_is_kept_when_next_layer_has_no_bias():
    params = _hand_mlp()
    params["fc1"]["kernel"][:, 0] = 0.0
    params["fc1"]["bias"][0] = 2.0
    del params["fc2"]["bias"]
    out = shrink(params, layers=NAMES)
    assert out.widths[0] == 3  # units 0, 2, 4: unit 0's constant cannot be folded
    np.testing.assert_array_equal(out.params["fc1"]["bias"], params["fc1"]["bias"][[0, 2, 4]])


def test_all_units_dead_keeps_one_inert_unit():
    params = _hand_mlp()
    params["fc2"]["kernel"][:] = 0.0
    params["fc2"]["bias"][:] = [0.5, -1.0, 2.0, 0.0]
    out = shrink(params, layers=NAMES)
    assert out.widths == (1, 1, 2)  # Flax cannot build a zero-width layer
    for leaf in jax.tree.leaves({k: out.params[k]["kernel"] for k in NAMES}):
        np.testing.assert_array_equal(leaf, 0.0)
    assert not out.masks["fc1"]["kernel"].any() and not out.masks["fc3"]["kernel"].any()
    x = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(
        _mlp_apply(out.params, x, NAMES), _mlp_apply(params, x, NAMES), atol=1e-5
    )


def _random_chain(data):
    n_layers = data.draw(st.integers(2, 4), label="n_layers")
    dims = data.draw(st.lists(st.integers(1, 6), min_size=n_layers + 1, max_size=n_layers + 1))
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    rng = np.random.default_rng(seed)
    names = [f"l{i}" for i in range(n_layers)]
    params, masks = {}, {}
    for i, name in enumerate(names):
        density = data.draw(st.sampled_from([0.0, 0.2, 0.5, 0.9]), label=f"density{i}")
        k = rng.normal(size=(dims[i], dims[i + 1])).astype(np.float32)
        b = rng.normal(size=dims[i + 1]).astype(np.float32)
        params[name] = {"kernel": k, "bias": b}
        masks[name] = {"kernel": rng.random(k.shape) < density, "bias": np.ones(b.shape, bool)}
    return names, params, masks, rng


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_shrink_property_outputs_equal_fixed_point_and_no_dead_units_left(data):
    names, params, masks, rng = _random_chain(data)
    before = copy.deepcopy(params)
    out = shrink(params, layers=names, masks=masks, activation=_relu)
    x = rng.normal(size=(4, params[names[0]]["kernel"].shape[0])).astype(np.float32)
    np.testing.assert_allclose(
        _mlp_apply(out.params, x, names),
        _mlp_apply(jax.tree.map(lambda m, p: np.where(m, p, 0), masks, params), x, names),
        atol=1e-5,
        rtol=1e-5,
    )
    jax.tree.map(np.testing.assert_array_equal, params, before)  # input untouched
    assert out.widths[-1] == params[names[-1]]["kernel"].shape[-1]
    assert jax.tree.map(np.shape, out.masks) == jax.tree.map(np.shape, out.params)
    # Fixed point: every hidden unit left has live inputs and outputs (or is the inert spare).
    for a, b in itertools.pairwise(names):
        k_in, k_out = np.asarray(out.params[a]["kernel"]), np.asarray(out.params[b]["kernel"])
        has_in, has_out = (k_in != 0).any(axis=0), (k_out != 0).any(axis=1)
        inert = k_in.shape[1] == 1 and not has_in[0] and not has_out[0]
        assert inert or (has_in & has_out).all()
    assert shrink(out.params, layers=names, masks=out.masks, activation=_relu).widths == out.widths


def _lenet_masks(params, layers):
    def smallest_fifth_pruned(leaf):
        magnitude = np.abs(np.asarray(leaf))
        return magnitude >= np.quantile(magnitude, 0.2) if leaf.ndim == 2 else magnitude >= 0

    masks = jax.tree.map(smallest_fifth_pruned, params)  # NumPy: no compilation per shape
    return neuron_masks(params, 0.5, layers=layers, previous=masks)


def _linen_params(model):
    """Random NumPy weights for a model on 8x8 images (no compiled init: it would cost seconds)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype), shapes)


def test_linen_model_runs_shrunk_params_with_new_widths():
    model = LeNet300100(hidden=(24, 12))
    x = np.random.default_rng(0).random((5, 8, 8, 1), np.float32)
    params = _linen_params(model)
    masks = _lenet_masks(params, ["fc1", "fc2", "fc3"])
    out = shrink(params, layers=["fc1", "fc2", "fc3"], masks=masks)
    assert out.widths == (12, 6, 10)
    small = LeNet300100(hidden=out.widths[:-1])
    np.testing.assert_allclose(
        jax.jit(small.apply)({"params": out.params}, x),
        jax.jit(model.apply)({"params": apply_masks(params, masks)}, x),
        atol=1e-5,
    )
    text = str(out.report)
    assert "fc1" in text and "36" in text and "18" in text  # hidden units before and after


def _nnx_model(build):
    """An NNX model with random NumPy weights: eager NNX initialisers compile once per shape."""
    model = nnx.eval_shape(build)
    rng = np.random.default_rng(0)
    state = jax.tree.map(
        lambda s: rng.normal(0, 0.3, s.shape).astype(s.dtype), nnx.state(model, nnx.Param)
    )
    nnx.update(model, state)
    return model


def test_nnx_model_runs_shrunk_state_with_new_widths():
    model = _nnx_model(lambda: NNXLeNet300100(in_features=64, hidden=(24, 12), rngs=nnx.Rngs(0)))
    x = np.random.default_rng(0).random((5, 8, 8, 1), np.float32)
    state = nnx.state(model, nnx.Param)
    masks = _lenet_masks(state, ["fc1", "fc2", "fc3"])
    out = shrink(state, layers=["fc1", "fc2", "fc3"], masks=masks)
    assert out.widths == (12, 6, 10)
    small = nnx.eval_shape(lambda: NNXLeNet300100(64, out.widths[:-1], rngs=nnx.Rngs(1)))
    nnx.update(small, out.params)  # the abstract model takes the shrunk arrays
    nnx.update(model, apply_masks(state, masks))
    np.testing.assert_allclose(small(x), model(x), atol=1e-5)
    assert isinstance(out.masks["fc1"]["kernel"], nnx.Param)


def test_nnx_list_paths():
    class Chain(nnx.Module):
        def __init__(self, dims, *, rngs):
            self.layers = nnx.List(
                [nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(dims)]
            )

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = jax.nn.relu(layer(x))
            return self.layers[-1](x)

    model = _nnx_model(lambda: Chain((6, 8, 3), rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    masks = neuron_masks(state, 0.25, layers=["layers/0", "layers/1"])
    out = shrink(state, layers=["layers/0", "layers/1"], masks=masks)
    assert out.widths == (6, 3)
    small = nnx.eval_shape(lambda: Chain((6, *out.widths), rngs=nnx.Rngs(1)))
    nnx.update(small, out.params)
    x = jax.random.normal(jax.random.key(2), (4, 6))
    nnx.update(model, apply_masks(state, masks))
    np.testing.assert_allclose(small(x), model(x), atol=1e-5)


def test_conv_head_channel_removal():
    model = LeNet5(channels=(4, 6), hidden=12, padding="SAME")
    x = np.random.default_rng(0).random((3, 8, 8, 1), np.float32)
    shapes = {"conv1": (5, 5, 1, 4), "conv2": (5, 5, 4, 6), "fc1": (24, 12), "fc2": (12, 10)}
    rng = np.random.default_rng(1)
    params = {
        name: {
            "kernel": rng.normal(0, 0.3, shape).astype(np.float32),
            "bias": rng.normal(0, 0.1, shape[-1]).astype(np.float32),
        }
        for name, shape in shapes.items()
    }
    params["conv2"]["kernel"][:, :, 1, :] = 0.0  # conv1 channel 1: no outgoing -> removed
    params["conv1"]["kernel"][..., 2] = 0.0  # conv1 channel 2: empty filter, bias != 0 -> kept
    params["conv1"]["bias"][2] = 0.7
    params["conv2"]["kernel"][..., 3] = 0.0  # conv2 channel 3: empty filter, zero bias -> removed
    params["conv2"]["bias"][3] = 0.0
    params["fc1"]["kernel"][5::6, :] = 0.0  # conv2 channel 5: no outgoing across the flatten
    params["fc1"]["kernel"][:, 7] = 0.0  # fc1 unit 7: no inputs, folded into fc2's bias
    params["fc1"]["bias"][7] = 1.5
    layers = ["conv1", "conv2", "fc1", "fc2"]
    out = shrink(params, layers=layers, activation=[_identity, _identity, jax.nn.relu])
    assert out.widths == (3, 4, 11, 10)
    small = LeNet5(channels=out.widths[:2], hidden=out.widths[2], padding="SAME")
    np.testing.assert_allclose(
        jax.jit(small.apply)({"params": out.params}, x),
        jax.jit(model.apply)({"params": params}, x),
        atol=1e-5,
    )


def test_neuron_masks_scores_by_hand():
    k1 = np.array([[3.0, 1.0, 2.0], [0.0, 1.0, 0.0]])  # incoming norms 3, 1.41, 2
    k2 = np.array([[0.1], [5.0], [1.0]])  # outgoing norms 0.1, 5, 1
    params = {"a": {"kernel": k1, "bias": np.zeros(3)}, "b": {"kernel": k2, "bias": np.zeros(1)}}

    def pruned(score):
        m = neuron_masks(params, 1 / 3, layers=["a", "b"], score=score)
        dead = ~np.asarray(m["a"]["kernel"]).any(axis=0)
        np.testing.assert_array_equal(dead, ~np.asarray(m["a"]["bias"]))
        np.testing.assert_array_equal(dead, ~np.asarray(m["b"]["kernel"]).any(axis=1))
        assert np.asarray(m["b"]["bias"]).all()  # output units are never pruned
        return np.flatnonzero(dead).tolist()

    assert pruned("incoming") == [1]
    assert pruned("outgoing") == [0]
    assert pruned("both") == [0]  # products 0.3, 7.07, 2


@settings(max_examples=20, deadline=None)
@given(
    widths=st.lists(st.integers(1, 9), min_size=2, max_size=3),
    sparsity=st.floats(0.0, 0.99),
    score=st.sampled_from(["incoming", "outgoing", "both"]),
)
def test_neuron_masks_prune_the_requested_number_of_units(widths, sparsity, score):
    rng = np.random.default_rng(len(widths))
    dims = [5, *widths, 3]
    names = [f"l{i}" for i in range(len(dims) - 1)]
    params = {
        n: {"kernel": rng.normal(size=(a, b)), "bias": rng.normal(size=b)}
        for n, a, b in zip(names, dims[:-1], dims[1:], strict=True)
    }
    masks = neuron_masks(params, sparsity, layers=names, score=score)
    pruned = [int(np.floor(sparsity * w + 0.5)) for w in widths]
    for name, k in zip(names[:-1], pruned, strict=True):
        chosen = ~np.asarray(masks[name]["bias"])
        assert chosen.sum() == k
        np.testing.assert_array_equal(~np.asarray(masks[name]["kernel"]).any(axis=0)[chosen], True)
    if all(k < w for k, w in zip(pruned, widths, strict=True)):  # else the next layer dies too
        kept = tuple(w - k for w, k in zip(widths, pruned, strict=True))
        assert shrink(params, layers=names, masks=masks).widths == (*kept, 3)


def test_neuron_masks_compose_with_previous_masks():
    params = _hand_mlp()
    params["fc1"]["kernel"][:, 3] = 1.0  # no other unit of fc1 may score 0
    params["fc2"]["kernel"][1, :] = 1.0
    prev = jax.tree.map(lambda a: np.ones(a.shape, bool), params)
    prev["fc1"]["kernel"][:, 4] = False  # unit 4 already emptied by earlier pruning
    prev["fc2"]["kernel"][0, 0] = False  # an unstructured cut that must survive
    masks = neuron_masks(params, 0.2, layers=NAMES, previous=prev)
    dead = ~np.asarray(masks["fc1"]["kernel"]).any(axis=0)
    assert dead.tolist() == [False, False, False, False, True]  # the emptied unit ranks first
    for m, p in zip(jax.tree.leaves(masks), jax.tree.leaves(prev), strict=True):
        assert not (np.asarray(m) & ~np.asarray(p)).any()  # nothing pruned comes back


def _train(params, tx, steps=8):
    model = LeNet300100(hidden=(16, 8))
    x = jax.random.uniform(jax.random.key(3), (32, 8, 8, 1))
    y = jax.random.randint(jax.random.key(4), (32,), 0, 10)

    def loss(p):
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    with count_compiles() as compiles:
        for _ in range(steps):
            params, state = step(params, state)
    assert compiles.of("step") == 1, compiles.names
    return params


@pytest.mark.parametrize("optimizer", ["prune_gradients", "keep_pruned"])
def test_structured_masks_stay_pruned_through_retraining(optimizer):
    model = LeNet300100(hidden=(16, 8))
    params = _linen_params(model)
    masks = neuron_masks(params, 0.5, layers=["fc1", "fc2", "fc3"])
    if optimizer == "prune_gradients":
        tx = optax.chain(prune_gradients(masks, weight_decay=1e-4), optax.sgd(0.1))
    else:
        tx = keep_pruned(optax.sgd(0.1, momentum=0.9), masks, weight_decay=1e-4)
    trained = _train(apply_masks(params, masks), tx)
    for p, m in zip(jax.tree.leaves(trained), jax.tree.leaves(masks), strict=True):
        assert not np.asarray(p)[~np.asarray(m)].any()
    changed = np.asarray(trained["fc1"]["kernel"] != params["fc1"]["kernel"])
    assert changed[np.asarray(masks["fc1"]["kernel"])].any()  # survivors did train
    out = shrink(trained, layers=["fc1", "fc2", "fc3"], masks=masks)
    assert out.widths == (8, 4, 10)


def test_structured_masks_compose_with_the_round_driver():
    model = LeNet300100(hidden=(16, 8))
    params = _linen_params(model)
    names = ["fc1", "fc2", "fc3"]
    masks = neuron_masks(params, 0.5, layers=names)
    x = jax.random.uniform(jax.random.key(3), (16, 8, 8, 1))
    y = jax.random.randint(jax.random.key(4), (16,), 0, 10)

    def loss(p, batch, rng):
        del rng
        logits = model.apply({"params": p}, batch[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    # Start the driver from the neuron masks; its Han round (q = 0.5) prunes on top of them.
    start = RoundsState(0, apply_masks(params, masks), masks, None, ())
    runs = prune_and_retrain(
        params,
        loss,
        lambda e: [(x, y)] * 3,
        lambda p: 0.0,
        rounds=1,
        optimizer=optax.sgd(0.05, momentum=0.9),
        q=0.5,
        resume=start,
    )
    final = list(runs)[-1]
    for p, m, m0 in zip(*map(jax.tree.leaves, (final.params, final.masks, masks)), strict=True):
        assert not np.asarray(m)[~np.asarray(m0)].any()  # structured cuts stay
        assert not np.asarray(p)[~np.asarray(m)].any()
    kernels_kept = [
        sum(np.asarray(m[n]["kernel"]).sum() for n in names) for m in (masks, final.masks)
    ]
    assert kernels_kept[1] < kernels_kept[0]  # and Han's rule cut more
    out = shrink(final.params, layers=names, masks=final.masks)
    assert out.widths[0] <= 8 and out.widths[1] <= 4


def _err_params():
    return _hand_mlp()


@pytest.mark.parametrize(
    ("mutate", "kwargs", "error", "match"),
    [
        (lambda p: p.update(norm={"scale": np.ones(5)}), {}, ValueError, r"'norm/scale'.*no layer"),
        (
            lambda p: p["fc2"].update(scale=np.ones(4)),
            {},
            ValueError,
            r"layer 'fc2' has leaves \['bias', 'kernel', 'scale'\]",
        ),
        (
            lambda p: p["fc2"].update(kernel=np.ones((6, 4), np.float32)),
            {},
            ValueError,
            r"'fc1' and 'fc2' do not chain: 'fc1' has 5 outputs .* 'fc2' takes 6 inputs",
        ),
        (None, {"layers": ["fc1", "fc3", "fc2"]}, ValueError, r"'fc1' and 'fc3' do not chain"),
        (None, {"layers": ["fc1", "fc2"]}, ValueError, r"'fc3/bias' belongs to no layer"),
        (None, {"layers": [*NAMES, "fc9"]}, ValueError, r"'fc9'.*no leaf under 'fc9/'"),
        (None, {"layers": "fc1"}, TypeError, r"layers must be a sequence"),
        (None, {"layers": ["fc1", "fc1"]}, ValueError, r"\['fc1'\] more than once"),
        (None, {"activation": "relu"}, TypeError, r"activation must be a callable"),
        (None, {"activation": [jax.nn.relu]}, ValueError, r"activation has 1 entries, expected 2"),
    ],
)
def test_shrink_errors_name_the_layer(mutate, kwargs, error, match):
    params = _err_params()
    if mutate is not None:
        mutate(params)
    before = copy.deepcopy(params)
    with pytest.raises(error, match=match):
        shrink(params, **{"layers": NAMES, **kwargs})
    jax.tree.map(np.testing.assert_array_equal, params, before)


def test_dense_to_conv_is_refused():
    params = {
        "fc": {"kernel": np.ones((4, 3), np.float32)},
        "conv": {"kernel": np.ones((3, 3, 3, 2), np.float32)},
    }
    with pytest.raises(ValueError, match=r"layer 'conv' .* follows the Dense layer 'fc'"):
        shrink(params, layers=["fc", "conv"])


def test_conv_to_dense_flatten_must_divide():
    params = {
        "conv": {"kernel": np.ones((3, 3, 1, 4), np.float32)},
        "fc": {"kernel": np.ones((10, 2), np.float32)},
    }
    with pytest.raises(ValueError, match=r"expected a multiple of 4"):
        shrink(params, layers=["conv", "fc"])


def test_masks_that_do_not_match_are_refused():
    params = _hand_mlp()
    masks = jax.tree.map(lambda a: np.ones(a.shape, bool), params)
    masks["fc2"]["kernel"] = np.ones((5, 3), bool)
    with pytest.raises(ValueError, match=r"masks\['fc2/kernel'\] has shape \(5, 3\)"):
        shrink(params, layers=NAMES, masks=masks)
    masks["fc2"]["kernel"] = np.ones((5, 4), np.float32)
    with pytest.raises(TypeError, match=r"masks\['fc2/kernel'\] has dtype float32, expected bool"):
        shrink(params, layers=NAMES, masks=masks)
    with pytest.raises(TypeError, match=r"previous\['fc2/kernel'\] has dtype float32"):
        neuron_masks(params, 0.5, layers=NAMES, previous=masks)


def test_neuron_masks_bad_arguments():
    params = _hand_mlp()
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        neuron_masks(params, 1.0, layers=NAMES)
    with pytest.raises(TypeError, match=r"sparsity must be a float"):
        neuron_masks(params, "half", layers=NAMES)
    with pytest.raises(ValueError, match=r"sparsity has 3 entries, expected 2"):
        neuron_masks(params, [0.1, 0.2, 0.3], layers=NAMES)
    with pytest.raises(ValueError, match=r"score must be one of .* got 'l1'"):
        neuron_masks(params, 0.5, layers=NAMES, score="l1")


@pytest.mark.slow  # a benchmark's smoke run (trains three models): CI runs it in its second step
@pytest.mark.standard_promotion  # optax's Adam / a test model's broadcast bias
def test_benchmark_quick_runs():
    spec = importlib.util.spec_from_file_location("bench_shrink", ROOT / "benchmarks/shrink.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--quick"])
    assert result["neuron50"]["widths"][:2] == (150, 50)
    assert set(result["neuron50"]["time_ratio"]) == {1, 64, 1024}
