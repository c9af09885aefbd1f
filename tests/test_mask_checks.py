"""One mask check everywhere: each mistake raises one exception type, naming the leaf and the fix.

Mistakes and their exceptions (see ``jaxprune._tree.check_masks``): a non-boolean mask is a
``TypeError``; a mask tree of another structure or shape is a ``ValueError``; an option of the
wrong type is a ``TypeError``, one of the right type but a bad value a ``ValueError``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
from jaxprune.transform import keep_pruned, prune_gradients, update_masks

PARAMS = {"Dense_0": {"kernel": np.ones((2, 3), np.float32), "bias": np.ones(3, np.float32)}}
BOOL = jax.tree.map(lambda x: np.ones(x.shape, bool), PARAMS)


def with_kernel_mask(value):
    return {"Dense_0": {"kernel": value, "bias": np.ones(3, bool)}}


def state_of(masks=BOOL):
    return keep_pruned(optax.sgd(0.1), masks).init(PARAMS)


# Every function that takes masks, as f(masks); the name the message uses for them.
TAKERS = {
    "apply_masks": (lambda m: jaxprune.apply_masks(PARAMS, m), "masks"),
    "compute_masks(previous=)": (
        lambda m: jaxprune.compute_masks(PARAMS, 1.0, previous=m),
        "previous",
    ),
    "masks_for_sparsity(previous=)": (
        lambda m: jaxprune.masks_for_sparsity(PARAMS, 0.5, previous=m),
        "previous",
    ),
    "keep_pruned": (lambda m: keep_pruned(optax.sgd(0.1), m).init(PARAMS), "masks"),
    "prune_gradients": (lambda m: prune_gradients(m).init(PARAMS), "masks"),
    "update_masks": (lambda m: update_masks(state_of(), m), "new_masks"),
}


@pytest.mark.parametrize("taker", TAKERS)
@pytest.mark.parametrize(
    ("mask", "got"),
    [
        (np.full((2, 3), 0.3, np.float32), "has dtype float32, expected bool"),
        (jnp.ones((2, 3), jnp.int32), "has dtype int32, expected bool"),
        (True, "is bool True, expected a bool array of the leaf's shape"),
    ],
)
def test_a_non_boolean_mask_is_a_type_error_everywhere(taker, mask, got):
    fn, name = TAKERS[taker]
    with pytest.raises(TypeError, match=rf"{name}\['Dense_0/kernel'\] {got}.*m != 0, masks"):
        fn(with_kernel_mask(mask))


@pytest.mark.parametrize("taker", TAKERS)
def test_a_mask_of_another_shape_or_structure_is_a_value_error_everywhere(taker):
    fn, name = TAKERS[taker]
    with pytest.raises(ValueError, match=rf"{name}\['Dense_0/kernel'\] has shape \(3, 2\)"):
        fn(with_kernel_mask(np.ones((3, 2), bool)))
    with pytest.raises(ValueError, match=rf"{name} does not have .* missing .*Dense_0/bias"):
        fn({"Dense_0": {"kernel": np.ones((2, 3), bool)}})


def test_a_non_array_leaf_takes_true_only():
    params = {"kernel": np.ones((2, 2), np.float32), "step": 3}
    masks = {"kernel": np.ones((2, 2), bool), "step": False}
    with pytest.raises(TypeError, match=r"masks\['step'\] is bool False; .* Python value True"):
        jaxprune.apply_masks(params, masks)
    assert jaxprune.apply_masks(params, {**masks, "step": True})["step"] == 3


def test_float_masks_are_refused_at_the_factory_before_any_params():
    with pytest.raises(TypeError, match=r"masks\['w'\] has dtype float64, expected bool"):
        keep_pruned(optax.sgd(0.1), {"w": np.array([1.0, 0.3])})


@pytest.mark.parametrize(
    ("weight_decay", "err", "match"),
    [
        ("0.1", TypeError, r"weight_decay must be a real number, got str"),
        (True, TypeError, r"weight_decay must be a real number, got bool"),
        (-1.0, ValueError, r"weight_decay must be finite and in \[0\.0, inf\), got -1\.0"),
    ],
)
def test_weight_decay_type_and_value_errors(weight_decay, err, match):
    with pytest.raises(err, match=match):
        keep_pruned(optax.sgd(0.1), BOOL, weight_decay=weight_decay)


# --- apply_masks keeps every leaf's type and dtype ------------------------------------------------


def test_apply_masks_keeps_numpy_float64_with_x64_off():
    assert not jax.config.jax_enable_x64
    params = {"kernel": np.array([[1.5, -2.0]], np.float64)}
    out = jaxprune.apply_masks(params, {"kernel": np.array([[False, True]])})["kernel"]
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_array_equal(out, [[0.0, -2.0]])
    assert not np.signbit(out[0, 0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_apply_masks_keeps_jax_dtypes_eagerly_and_under_jit(dtype):
    params = {"kernel": jnp.asarray([[1.5, -2.0]], dtype)}
    masks = {"kernel": jnp.array([[False, True]])}
    for fn in (jaxprune.apply_masks, jax.jit(jaxprune.apply_masks)):
        out = fn(params, masks)["kernel"]
        assert isinstance(out, jax.Array) and out.dtype == dtype
        np.testing.assert_array_equal(out.astype(jnp.float32), [[0.0, -2.0]])


# --- keep_pruned and non-finite pruned weights ------------------------------------------------------


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_keep_pruned_refuses_a_non_finite_pruned_weight(value):
    params = {"w": jnp.array([[1.0, value]])}
    masks = {"w": jnp.array([[True, False]])}
    tx = keep_pruned(optax.sgd(0.1, momentum=0.9), masks)
    with pytest.raises(
        ValueError, match=r"params\['w'\] has NaN or inf at pruned positions.*apply"
    ):
        tx.init(params)
    params = jaxprune.apply_masks(params, masks)  # the fix the message gives
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update({"w": jnp.ones((1, 2))}, state, params)
        params = optax.apply_updates(params, updates)
    assert params["w"][0, 1] == 0.0 and bool(jnp.isfinite(params["w"]).all())


def test_keep_pruned_allows_a_non_finite_kept_weight():
    # Only pruned positions get -w; a kept inf is the model's business, not a mask error.
    tx = keep_pruned(optax.sgd(0.1), {"w": jnp.array([True, False])})
    tx.init({"w": jnp.array([np.inf, 0.0])})
