"""Tests for jaxprune.transform: masked optimizers keep pruned weights at exactly zero."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import count_compiles, optax_step
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune.masks import apply_masks, compute_masks
from jaxprune.transform import (
    KeepPrunedState,
    PruneGradientsState,
    keep_pruned,
    prune_gradients,
    update_masks,
)

SHAPES = {"Dense_0": {"kernel": (6, 5), "bias": (5,)}, "Conv_0": {"kernel": (3, 3, 2, 4)}}

OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.05),
    "momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "nesterov": lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(0.01),
    "adamw": lambda: optax.adamw(0.01, weight_decay=0.1),
    "rmsprop": lambda: optax.rmsprop(0.01, momentum=0.5),
}


def _is_shape(x):
    return isinstance(x, tuple)


def _tree(seed, dtype=np.float32):
    # numpy, not jax.random: compiling threefry costs seconds on a 2-core machine
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s).astype(dtype)), SHAPES, is_leaf=_is_shape
    )


def _random_masks(seed, density):
    """Random masks on the kernels (ndim >= 2), all-True on the biases, like compute_masks."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.random(s) < density if len(s) >= 2 else np.ones(s, bool)),
        SHAPES,
        is_leaf=_is_shape,
    )


def _pruned_values(params, masks):
    return np.concatenate(
        [
            np.asarray(p)[~np.asarray(m)]
            for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks), strict=True)
        ]
    )


def _assert_survivors_close(got, want, masks):
    for g, w, m in zip(
        jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(masks), strict=True
    ):
        m = np.asarray(m)
        np.testing.assert_allclose(np.asarray(g)[m], np.asarray(w)[m], rtol=2e-5, atol=1e-6)


@functools.cache
def _compiled_pair(name):
    """One jitted masked step and its unmasked reference per optimizer: masks are in the state."""
    weight_decay = 0.0 if name == "adamw" else 0.05  # AdamW brings its own decoupled decay.
    placeholder = jax.tree.map(lambda s: jnp.ones(s, bool), SHAPES, is_leaf=_is_shape)
    tx = keep_pruned(OPTIMIZERS[name](), placeholder, weight_decay=weight_decay)
    ref_tx = optax.chain(optax.add_decayed_weights(weight_decay), OPTIMIZERS[name]())
    return tx, optax_step(tx), ref_tx, optax_step(ref_tx)


@pytest.mark.standard_promotion  # optax's Adam / a test model's broadcast bias
@settings(max_examples=8, deadline=None)
@given(
    name=st.sampled_from(sorted(OPTIMIZERS)),
    seed=st.integers(0, 2**16),
    density=st.floats(0.05, 0.95),
    steps=st.integers(20, 50),
    warmup=st.integers(0, 5),
)
def test_pruned_stay_zero_and_survivors_match_unmasked(name, seed, density, steps, warmup):
    # Elementwise optimizers update each coordinate from its own gradient history only, so the
    # survivors must follow the unmasked optimizer fed the same gradients (plus the same L2 term),
    # even after `warmup` dense steps that leave momentum on the connections pruned later.
    params = _tree(seed)
    masks = _random_masks(seed + 1, density)
    dense = jax.tree.map(lambda m: jnp.ones_like(m), masks)
    grads = [_tree(seed + 2 + i) for i in range(warmup + steps)]

    tx, step, ref_tx, ref_step = _compiled_pair(name)
    state, ref_state, ref_params = tx.init(params), ref_tx.init(params), params
    state = update_masks(state, dense, allow_regrow=True)
    for g in grads[:warmup]:
        params, state = step(params, state, g)
        ref_params, ref_state = ref_step(ref_params, ref_state, g)
    state = update_masks(state, masks)  # params are left unmasked: the wrapper zeroes them
    ref_params = apply_masks(ref_params, masks)
    for g in grads[warmup:]:
        params, state = step(params, state, g)
        ref_params, ref_state = ref_step(ref_params, ref_state, g)

    pruned = _pruned_values(params, masks)
    assert np.all(pruned == 0.0), f"{np.count_nonzero(pruned)} pruned weights moved"
    _assert_survivors_close(params, ref_params, masks)


@pytest.mark.standard_promotion  # optax's Adam / a test model's broadcast bias
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_momentum_from_before_pruning_does_not_regrow(name):
    params = _tree(1)
    grads = _tree(2)
    tx, step, _, _ = _compiled_pair(name)
    state = tx.init(params)
    for _ in range(10):  # build momentum on every weight, the soon-pruned ones included
        params, state = step(params, state, grads)
    masks = compute_masks(params, 1.0)
    params = apply_masks(params, masks)
    state = update_masks(state, masks)
    for _ in range(30):
        params, state = step(params, state, grads)
    assert np.all(_pruned_values(params, masks) == 0.0)
    kernel = params["Dense_0"]["kernel"]
    assert np.any(np.asarray(kernel)[np.asarray(masks["Dense_0"]["kernel"])] != 0.0)


@pytest.mark.standard_promotion  # optax's Adam / a test model's broadcast bias
@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_prune_gradients_alone_lets_carried_momentum_regrow(name):
    # The failure keep_pruned exists for: gradients masked, momentum from before pruning not.
    params = _tree(1)
    grads = _tree(2)
    dense = compute_masks(params, 0.0)
    tx = optax.chain(prune_gradients(dense), OPTIMIZERS[name]())
    step = optax_step(tx)
    state = tx.init(params)
    for _ in range(5):
        params, state = step(params, state, grads)
    masks = compute_masks(params, 1.0)
    params = apply_masks(params, masks)
    params, state = step(params, update_masks(state, masks), grads)
    assert np.any(_pruned_values(params, masks) != 0.0)


def test_prune_gradients_adds_l2_to_survivors_only():
    params = {"w": jnp.array([[2.0, -4.0, 1.0]])}
    masks = {"w": jnp.array([[True, False, True]])}
    tx = prune_gradients(masks, weight_decay=0.25)
    updates, _ = tx.update({"w": jnp.array([[1.0, 1.0, -3.0]])}, tx.init(params), params)
    np.testing.assert_array_equal(updates["w"], [[1.5, 0.0, -2.75]])


def test_strict_dtype_promotion_and_bfloat16():
    params = {"w": jnp.ones((2, 2), jnp.bfloat16)}
    tx = keep_pruned(optax.sgd(1.0), {"w": jnp.eye(2, dtype=bool)}, weight_decay=0.5)
    with jax.numpy_dtype_promotion("strict"):
        updates, _ = tx.update({"w": jnp.ones((2, 2), jnp.bfloat16)}, tx.init(params), params)
    assert updates["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(updates["w"].astype(jnp.float32), [[-1.5, -1.0], [-1.0, -1.5]])


def test_integer_and_non_array_leaves_pass_through():
    params = {"w": jnp.ones((2, 2)), "count": jnp.array(3, jnp.int32), "name": "fc"}
    masks = {"w": jnp.array([[True, False], [False, True]]), "count": jnp.array(True), "name": True}
    tx = prune_gradients(masks, weight_decay=0.5)
    grads = {"w": jnp.ones((2, 2)), "count": jnp.array(7, jnp.int32), "name": "fc"}
    updates, _ = tx.update(grads, tx.init(params), params)
    assert updates["count"] == 7 and updates["count"].dtype == jnp.int32
    assert updates["name"] == "fc"
    np.testing.assert_array_equal(updates["w"], [[1.5, 0.0], [0.0, 1.5]])


@pytest.mark.standard_promotion  # optax's Adam / a test model's broadcast bias
@pytest.mark.parametrize(
    "wrap",
    [
        lambda tx: tx,
        lambda tx: optax.chain(optax.clip_by_global_norm(1.0), tx),
        lambda tx: optax.MultiSteps(optax.chain(optax.identity(), tx), every_k_schedule=1),
    ],
    ids=["bare", "chain", "multisteps"],
)
def test_update_masks_then_step_does_not_recompile(wrap):
    params = _tree(0)
    grads = _tree(1)
    masks = compute_masks(params, 0.5)
    tx = wrap(keep_pruned(optax.sgd(0.1, momentum=0.9), masks))
    step = optax_step(tx)
    state = tx.init(params)
    with count_compiles() as compiles:
        params, state = step(params, state, grads)
        for q in (0.8, 1.2):
            masks = compute_masks(params, q, previous=masks)
            state = update_masks(state, masks)
            params, state = step(params, state, grads)
            assert np.all(_pruned_values(params, masks) == 0.0)
    assert compiles.of("optax_step") == 1


def test_update_masks_replaces_every_state_and_keeps_the_rest():
    params = _tree(0)
    dense = compute_masks(params, 0.0)
    tx = optax.chain(prune_gradients(dense), keep_pruned(optax.adam(0.1), dense))
    state = tx.init(params)
    masks = compute_masks(params, 1.0)
    new = update_masks(state, masks)
    assert isinstance(new[0], PruneGradientsState) and isinstance(new[1], KeepPrunedState)
    for s in (new[0], new[1]):
        for got, want in zip(jax.tree.leaves(s.masks), jax.tree.leaves(masks), strict=True):
            np.testing.assert_array_equal(got, want)
    assert jax.tree.structure(new) == jax.tree.structure(state)
    # the input state still holds the old (dense) masks
    assert all(bool(np.all(m)) for m in jax.tree.leaves(state[1].masks))


@pytest.mark.standard_promotion  # optax's Adam / a test model's broadcast bias
def test_nnx_optimizer_keeps_pruned_weights_at_zero_and_update_masks_works():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(4, 8, rngs=rngs)
            self.fc2 = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.fc2(nnx.relu(self.fc1(x)))

    model = MLP(nnx.Rngs(jax.random.key(0, impl="rbg")))
    masks = compute_masks(nnx.state(model, nnx.Param), 0.8)
    nnx.update(model, apply_masks(nnx.state(model, nnx.Param), masks))
    optimizer = nnx.Optimizer(
        model, keep_pruned(optax.adam(0.05), masks, weight_decay=1e-3), wrt=nnx.Param
    )
    x, y = jnp.ones((3, 4)), jnp.zeros((3, 2))

    @nnx.jit
    def train(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean((m(x) - y - 1.0) ** 2))(model)
        optimizer.update(model, grads)

    for _ in range(5):
        train(model, optimizer)
    masks = compute_masks(nnx.state(model, nnx.Param), 1.0, previous=masks)
    optimizer.opt_state = update_masks(optimizer.opt_state, masks)
    for _ in range(5):
        train(model, optimizer)
    assert np.all(_pruned_values(nnx.state(model, nnx.Param), masks) == 0.0)


def test_masks_from_nnx_state_match_pure_arrays():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    state = nnx.state(model, nnx.Param)
    masks = compute_masks(state, 0.5)  # Param-wrapped masks
    tx = keep_pruned(optax.sgd(1.0), masks)
    pure = nnx.as_pure(state)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, pure), tx.init(pure), pure)
    kernel_mask = np.asarray(nnx.as_pure(masks)["kernel"])
    np.testing.assert_array_equal(np.asarray(updates["kernel"]) == -1.0, kernel_mask)


# --- bad input -----------------------------------------------------------------------------------


def test_a_bad_weight_decay_is_rejected():
    masks = {"w": jnp.ones((2, 2), bool)}
    expected = r"weight_decay must be finite and in \[0.0, inf\), got "
    with pytest.raises(ValueError, match=expected + "-0.1"):
        prune_gradients(masks, weight_decay=-0.1)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=expected + f"{bad}"):
            keep_pruned(optax.sgd(0.1), masks, weight_decay=bad)
    with pytest.raises(TypeError, match=r"weight_decay must be a real number, got str: '0.1'"):
        prune_gradients(masks, weight_decay="0.1")
    with pytest.raises(TypeError, match=r"weight_decay must be a concrete number, got a traced"):
        jax.jit(lambda wd: prune_gradients(masks, weight_decay=wd))(0.1)


def test_non_bool_mask_names_the_leaf():
    with pytest.raises(TypeError, match=r"masks\['Dense_0/kernel'\] has dtype float32, expected"):
        keep_pruned(optax.sgd(0.1), {"Dense_0": {"kernel": jnp.ones((2, 2))}})


def test_init_with_mismatched_masks_names_the_leaf():
    params = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
    tx = keep_pruned(optax.sgd(0.1), {"Dense_0": {"kernel": jnp.ones((2, 3), bool)}})
    with pytest.raises(ValueError, match=r"missing leaves \['Dense_0/bias'\]"):
        tx.init(params)
    tx = prune_gradients({"Dense_0": {"kernel": jnp.ones((2, 3), bool), "bias": jnp.ones(2, bool)}})
    with pytest.raises(ValueError, match=r"masks\['Dense_0/kernel'\] has shape \(2, 3\), expected"):
        tx.init(params)


def test_update_with_mismatched_updates_names_the_leaf():
    params = {"w": jnp.ones((2, 2))}
    tx = keep_pruned(optax.sgd(0.1), {"w": jnp.ones((2, 2), bool)})
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"masks\['w'\] has shape \(2, 2\), expected \(3, 2\)"):
        tx.update({"w": jnp.ones((3, 2))}, state, {"w": jnp.ones((3, 2))})


def test_weight_decay_without_params_is_an_error():
    tx = prune_gradients({"w": jnp.ones((2, 2), bool)}, weight_decay=0.1)
    state = tx.init({"w": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match=r"weight_decay=0.1 needs the params"):
        tx.update({"w": jnp.ones((2, 2))}, state)


def test_update_masks_on_a_state_without_jaxprune_state():
    state = optax.adam(0.1).init({"w": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match=r"holds no PruneGradientsState or KeepPrunedState"):
        update_masks(state, {"w": jnp.ones((2, 2), bool)})


def test_update_masks_with_mismatched_masks_names_the_leaf():
    tx = keep_pruned(optax.sgd(0.1), {"a": {"w": jnp.ones((2, 2), bool)}})
    state = tx.init({"a": {"w": jnp.ones((2, 2))}})
    with pytest.raises(ValueError, match=r"new_masks\['a/w'\] has shape \(2, 1\), expected"):
        update_masks(state, {"a": {"w": jnp.ones((2, 1), bool)}})


def test_update_masks_refuses_regrowth_unless_allowed():
    old = {"w": jnp.array([[True, False, False]])}
    params = {"w": jnp.array([[1.0, 0.0, 0.0]])}
    tx = keep_pruned(optax.sgd(1.0), old)
    state = tx.init(params)
    new = {"w": jnp.array([[True, True, True]])}
    with pytest.raises(
        ValueError, match=r"keeps connections that the current masks prune: 'w' \(2"
    ):
        update_masks(state, new)
    state = update_masks(state, new, allow_regrow=True)
    updates, _ = tx.update({"w": -jnp.ones((1, 3))}, state, params)
    np.testing.assert_array_equal(updates["w"], [[1.0, 1.0, 1.0]])  # revived weights learn again
