"""Tests of Han's mask rule, target-sparsity masks, apply_masks and summarize."""

import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune
from jaxprune._tree import leaves_with_paths


def tree_of(kernel, bias=None):
    kernel = np.asarray(kernel, np.float32)
    bias = np.zeros(kernel.shape[-1], np.float32) if bias is None else bias
    return {"Dense_0": {"kernel": kernel, "bias": bias}}


# --- worked by hand -------------------------------------------------------------------------


def test_hand_worked_masks_fresh_layer():
    # std of [1, -1, 3, -3] is sqrt(5) = 2.236; q=0.5 -> threshold 1.118.
    params = tree_of([[1.0, -1.0], [3.0, -3.0]])
    masks = jaxprune.compute_masks(params, 0.5)
    assert masks["Dense_0"]["kernel"].tolist() == [[False, False], [True, True]]
    assert masks["Dense_0"]["bias"].tolist() == [True, True]
    # q=0.4 -> threshold 0.894: everything stays.
    assert jaxprune.compute_masks(params, 0.4)["Dense_0"]["kernel"].all()


def test_std_is_over_all_entries_with_pruned_as_zero():
    # previous prunes 0.1 and -0.2. All-entry std of [0, 0, 1, 2, -3, 0.3] is 1.5316, so q=0.6
    # gives threshold 0.919 and keeps 1.0. Survivors-only std would be 1.8753 (threshold 1.125)
    # and would prune 1.0 as well: the rule pinned here is the first.
    params = tree_of([[0.1, -0.2, 1.0], [2.0, -3.0, 0.3]])
    previous = {
        "Dense_0": {
            "kernel": np.array([[False, False, True], [True, True, True]]),
            "bias": np.ones(3, bool),
        }
    }
    masks = jaxprune.compute_masks(params, 0.6, previous=previous)
    assert masks["Dense_0"]["kernel"].tolist() == [[False, False, True], [True, True, False]]


def test_q_mapping_by_layer_leaf_and_pattern():
    k = np.array([[1.0, -1.0], [3.0, -3.0]], np.float32)
    params = {"Dense_0": {"kernel": k}, "Dense_1": {"kernel": k}, "Conv_0": {"kernel": k}}
    masks = jaxprune.compute_masks(params, {"Dense_*": 0.5, "Dense_1/kernel": 0.0})
    assert masks["Dense_0"]["kernel"].sum() == 2  # pattern
    assert masks["Dense_1"]["kernel"].sum() == 4  # exact name wins over the pattern
    assert masks["Conv_0"]["kernel"].sum() == 4  # not named: not pruned


def test_masks_for_sparsity_by_hand_with_ties():
    params = {"kernel": np.array([[1.0, 1.0, 1.0, 2.0]], np.float32)}
    # Prune 2 of 4: the tie among the 1.0s is broken by position, earliest first.
    assert jaxprune.masks_for_sparsity(params, 0.5)["kernel"].tolist() == [
        [False, False, True, True]
    ]


def test_previous_pruned_weights_are_pruned_first_by_sparsity():
    params = {"kernel": np.array([[5.0, 1.0, 2.0, 3.0]], np.float32)}
    previous = {"kernel": np.array([[False, True, True, True]])}
    masks = jaxprune.masks_for_sparsity(params, 0.5, previous=previous)
    assert masks["kernel"].tolist() == [[False, False, True, True]]


# --- properties -----------------------------------------------------------------------------

# XLA on CPU flushes subnormals to zero, so they compare as 0.0: keep them out of the ranking checks.
finite = st.floats(-10, 10, allow_nan=False, allow_subnormal=False, width=32)
kernels = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6), elements=finite
)


@given(kernels, st.floats(0, 3), st.floats(0, 3))
def test_kept_fraction_non_increasing_in_q(kernel, q1, q2):
    lo, hi = sorted([q1, q2])
    params = tree_of(kernel)
    kept_lo = int(jaxprune.compute_masks(params, lo)["Dense_0"]["kernel"].sum())
    kept_hi = int(jaxprune.compute_masks(params, hi)["Dense_0"]["kernel"].sum())
    assert kept_hi <= kept_lo


@settings(max_examples=10)
@given(kernels, st.floats(0, 3), st.data())
def test_pruned_weight_never_comes_back(kernel, q, data):
    prev_kernel = data.draw(hnp.arrays(bool, kernel.shape))
    params = tree_of(kernel)
    previous = jax.tree.map(lambda x: np.ones(x.shape, bool), params)
    previous["Dense_0"]["kernel"] = prev_kernel
    masks = jaxprune.compute_masks(params, q, previous=previous)
    new = np.asarray(masks["Dense_0"]["kernel"])
    assert not np.any(new & ~prev_kernel)
    sparse = jaxprune.masks_for_sparsity(params, 0.3, previous=previous)
    assert not np.any(np.asarray(sparse["Dense_0"]["kernel"]) & ~prev_kernel)


@given(kernels, st.floats(0, 3))
def test_structure_shapes_and_dtypes_preserved(kernel, q):
    params = tree_of(kernel)
    masks = jaxprune.compute_masks(params, q)
    assert jax.tree.structure(masks) == jax.tree.structure(params)
    for (_, p), (_, m) in zip(leaves_with_paths(params), leaves_with_paths(masks), strict=True):
        assert m.shape == p.shape and m.dtype == jnp.bool_
    pruned = jaxprune.apply_masks(params, masks)
    for (_, p), (_, a) in zip(leaves_with_paths(params), leaves_with_paths(pruned), strict=True):
        assert a.shape == p.shape and a.dtype == p.dtype


@given(
    st.lists(kernels, min_size=1, max_size=3),
    st.floats(0, 0.99),
    st.sampled_from(["layer", "global"]),
)
def test_masks_for_sparsity_hits_the_exact_count(ks, sparsity, scope):
    params = {f"Dense_{i}": {"kernel": k} for i, k in enumerate(ks)}
    masks = jaxprune.masks_for_sparsity(params, sparsity, scope=scope)
    sizes = [k.size for k in ks]
    pruned = [int((~np.asarray(masks[f"Dense_{i}"]["kernel"])).sum()) for i in range(len(ks))]
    if scope == "layer":
        assert pruned == [int(np.floor(sparsity * n + 0.5)) for n in sizes]
    else:
        assert sum(pruned) == int(np.floor(sparsity * sum(sizes) + 0.5))


@given(kernels, st.floats(0.01, 0.99))
def test_global_and_layer_agree_for_one_layer_and_keep_the_largest(kernel, sparsity):
    params = {"kernel": kernel}
    layer = np.asarray(jaxprune.masks_for_sparsity(params, sparsity)["kernel"])
    assert np.array_equal(
        layer, np.asarray(jaxprune.masks_for_sparsity(params, sparsity, scope="global")["kernel"])
    )
    if layer.any() and (~layer).any():
        assert np.abs(kernel[layer]).min() >= np.abs(kernel[~layer]).max()


@given(kernels)
def test_apply_masks_zeroes_exactly_and_does_not_mutate(kernel):
    params = tree_of(kernel, bias=np.arange(kernel.shape[-1], dtype=np.float32))
    before = jax.tree.map(np.copy, params)
    masks = jaxprune.compute_masks(params, 1.0)
    out = jaxprune.apply_masks(params, masks)
    k, m = np.asarray(out["Dense_0"]["kernel"]), np.asarray(masks["Dense_0"]["kernel"])
    assert np.all(k[~m] == 0) and not np.any(np.signbit(k[~m]))
    assert np.array_equal(k[m], kernel[m])
    assert np.array_equal(np.asarray(out["Dense_0"]["bias"]), params["Dense_0"]["bias"])
    jax.tree.map(np.testing.assert_array_equal, params, before)


# --- Linen and NNX --------------------------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8)(x))
        return nn.Dense(2)(h)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(5, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)])

    def __call__(self, x):
        return self.layers[1](nnx.relu(self.layers[0](x)))


def test_linen_and_nnx_give_the_same_masks():
    linen = LinenMLP().init(jax.random.key(0), jnp.ones((1, 5)))["params"]
    model = NNXMLP(nnx.Rngs(1))
    for i in range(2):
        model.layers[i].kernel[...] = linen[f"Dense_{i}"]["kernel"]
        model.layers[i].bias[...] = linen[f"Dense_{i}"]["bias"]
    state = nnx.state(model, nnx.Param)

    lm = jaxprune.compute_masks(linen, {"Dense_0": 0.7, "Dense_1": 1.2})
    nm = jaxprune.compute_masks(state, {"layers/0": 0.7, "layers/1": 1.2})
    paths = [p for p, _ in leaves_with_paths(nm)]
    assert paths == ["layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel"]
    assert jax.tree.structure(nm) == jax.tree.structure(state)
    for i in range(2):
        assert np.array_equal(lm[f"Dense_{i}"]["kernel"], nm["layers"][i]["kernel"][...])
    assert not np.asarray(lm["Dense_0"]["kernel"]).all()

    # Putting pruned weights back into the NNX model works through nnx.update.
    nnx.update(model, jaxprune.apply_masks(state, nm))
    assert np.count_nonzero(model.layers[0].kernel[...]) == int(lm["Dense_0"]["kernel"].sum())


def test_jit_does_not_recompile_for_a_new_q():
    params = tree_of(np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32))
    traces = []

    @jax.jit
    def masks_at(params, q):
        traces.append(1)
        return jaxprune.compute_masks(params, q)

    a = masks_at(params, 0.5)
    b = masks_at(params, 1.5)
    assert len(traces) == 1
    assert int(b["Dense_0"]["kernel"].sum()) < int(a["Dense_0"]["kernel"].sum())
    eager = jaxprune.compute_masks(params, 1.5)
    assert np.array_equal(b["Dense_0"]["kernel"], eager["Dense_0"]["kernel"])


def test_strict_dtype_promotion_and_bfloat16():
    params = {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.bfloat16)}
    with jax.numpy_dtype_promotion("strict"):
        masks = jaxprune.compute_masks(params, 0.5)
        sparse = jaxprune.masks_for_sparsity(params, 0.25)
        out = jaxprune.apply_masks(params, masks)
    assert out["kernel"].dtype == jnp.bfloat16 and int(sparse["kernel"].sum()) == 12


# --- summaries ------------------------------------------------------------------------------


def test_summarize_rows_and_table():
    params = {"Dense_0": {"kernel": np.ones((4, 5), np.float32), "bias": np.ones(5, np.float32)}}
    masks = jax.tree.map(lambda x: np.ones(x.shape, bool), params)
    masks["Dense_0"]["kernel"][:, :4] = False
    s = jaxprune.summarize(params, masks)
    assert [(r.path, r.total, r.kept) for r in s.rows] == [("Dense_0/kernel", 20, 4)]
    assert (s.total, s.kept, s.kept_fraction) == (20, 4, 0.2)
    text = str(s)
    assert "Dense_0/kernel" in text and "20.00%" in text and "5.0x fewer" in text


# --- bad input ------------------------------------------------------------------------------

PARAMS = tree_of(np.ones((3, 2), np.float32))


@pytest.mark.parametrize(
    ("q", "err", "match"),
    [
        (-0.1, ValueError, r"q must be finite and in \[0.0, inf\), got -0.1"),
        (float("nan"), ValueError, r"q must be finite"),
        (float("inf"), ValueError, r"q must be finite"),
        ("1.0", TypeError, r"q must be a real number, got str"),
        (np.ones(2), ValueError, r"q must be a scalar"),
        ({"Dense_9": 1.0}, ValueError, r"q names \['Dense_9'\], which match no prunable leaf"),
        ({"Dense_0": -1.0}, ValueError, r"q\['Dense_0'\] must be finite"),
    ],
)
def test_bad_q(q, err, match):
    with pytest.raises(err, match=match):
        jaxprune.compute_masks(PARAMS, q)


def test_ambiguous_q_patterns():
    with pytest.raises(ValueError, match=r"several patterns .* matching 'Dense_0/kernel'"):
        jaxprune.compute_masks(PARAMS, {"Dense*": 1.0, "*_0": 2.0})


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be finite and in \[0.0, 1.0\)"):
        jaxprune.masks_for_sparsity(PARAMS, sparsity)


def test_bad_scope():
    with pytest.raises(ValueError, match="scope must be 'layer' or 'global', got 'model'"):
        jaxprune.masks_for_sparsity(PARAMS, 0.5, scope="model")


def test_previous_with_other_structure_or_shape():
    with pytest.raises(
        ValueError, match=r"previous does not have the tree structure.*Dense_0/bias"
    ):
        jaxprune.compute_masks(PARAMS, 1.0, previous={"Dense_0": {"kernel": np.ones((3, 2), bool)}})
    bad = {"Dense_0": {"kernel": np.ones((2, 3), bool), "bias": np.ones(2, bool)}}
    with pytest.raises(
        ValueError, match=r"previous\['Dense_0/kernel'\] has shape \(2, 3\), expected \(3, 2\)"
    ):
        jaxprune.masks_for_sparsity(PARAMS, 0.5, previous=bad)
    with pytest.raises(ValueError, match=r"masks\['Dense_0/kernel'\] has shape"):
        jaxprune.apply_masks(PARAMS, bad)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("shape", [(2, 2), (64, 64), (300, 100)])
def test_non_finite_weights(value, shape):
    # On CPU, XLA's vectorised max of |w| drops NaN from 64x64 on: the check must not use it.
    kernel = np.ones(shape, np.float32)
    kernel[-1, -1] = value
    with pytest.raises(ValueError, match=r"params\['Dense_0/kernel'\] contains NaN or inf"):
        jaxprune.compute_masks(tree_of(kernel), 1.0)


def test_no_prunable_leaf():
    with pytest.raises(ValueError, match=r"params has no prunable leaf.*Dense_0/bias"):
        jaxprune.compute_masks({"Dense_0": {"bias": np.ones(3, np.float32)}}, 1.0)


def test_integer_leaf_selected_by_where():
    params = {"step": np.ones((2, 2), np.int32), "kernel": np.ones((2, 2), np.float32)}
    with pytest.raises(TypeError, match=r"params\['step'\] was selected .* dtype int32"):
        jaxprune.compute_masks(params, 1.0, where=lambda path, leaf: True)
    masks = jaxprune.compute_masks(params, 1.0)  # default rule leaves integers alone
    assert masks["step"].all()
    assert jaxprune.apply_masks(params, masks)["step"] is params["step"]
