"""N:M masks: the rule against a NumPy reference, errors, and their use by every other part."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import count_compiles
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.sparse import BCOO

import jaxprune
from jaxprune import apply_masks, keep_pruned, nm_masks, nm_pattern, nm_patterns
from jaxprune.rounds import prune_and_retrain


def reference(w, prev, n, m, axis):
    """Per group of m along axis: a stable argsort, the last n survivors kept (earlier tie cut)."""
    score = np.abs(w.astype(np.float32))
    score = np.where(prev, score, -1.0)
    moved = np.moveaxis(score, axis, -1)
    groups = moved.reshape(-1, m)
    keep = np.zeros(groups.shape, bool)
    for i, g in enumerate(groups):
        keep[i, np.argsort(g, kind="stable")[-n:]] = True
    keep = np.moveaxis(keep.reshape(moved.shape), -1, axis)
    return keep & prev


def group_counts(mask, axis, m):
    moved = np.moveaxis(np.asarray(mask), axis, -1)
    return moved.reshape(-1, m).sum(-1)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), padding="SAME")(x))  # kernel (3, 3, 4, 8)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(4)(x)


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def linen():
    model = LinenNet()
    params = model.init(jax.random.key(0), jnp.ones((1, 4, 4, 4)))["params"]
    return model, params


@pytest.fixture(scope="module")
def nnx_model():
    return NNXNet(nnx.Rngs(0))


# --- the rule -----------------------------------------------------------------------------------


def test_dense_by_hand_with_previous_and_ties():
    kernel = np.array([[1.0, 5.0], [-3.0, 2.0], [3.0, -2.0], [0.5, 0.1]], np.float32)
    got = nm_masks({"d": {"kernel": kernel, "bias": np.ones(2)}}, 2, 4)
    # column 0: -3 and 3 tie for first, both kept; column 1: 5, then the tied 2 and -2: the
    # earlier one is pruned, as in masks_for_sparsity
    assert np.asarray(got["d"]["kernel"]).T.tolist() == [
        [False, True, True, False],
        [True, False, True, False],
    ]
    assert np.asarray(got["d"]["bias"]).all()
    previous = {"d": {"kernel": np.array([[1, 1], [0, 1], [0, 0], [1, 0]], bool), "bias": True}}
    got = nm_masks({"d": {"kernel": kernel, "bias": 0.0}}, 2, 4, previous=previous)
    # column 0 keeps its two survivors 1.0 and 0.5; column 1 has a single survivor left
    assert np.asarray(got["d"]["kernel"]).T.tolist() == [
        [True, False, False, True],
        [True, True, False, False],
    ]
    assert got["d"]["bias"] is True


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_keeps_the_n_largest_of_every_group(data):
    ndim = data.draw(st.integers(1, 4))
    m = data.draw(st.sampled_from([1, 2, 3, 4, 8]))
    n = data.draw(st.integers(1, m))
    axis = data.draw(st.integers(-ndim, ndim - 1))
    shape = [data.draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[axis] *= m
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    # small integers make many ties; the signs and -0.0 must not matter
    w = rng.integers(-3, 4, shape).astype(np.float32) * data.draw(st.sampled_from([1.0, -1.0]))
    prev = rng.random(shape) < data.draw(st.sampled_from([1.0, 0.7, 0.3]))
    got = np.asarray(nm_masks({"w": w}, n, m, axis=axis, previous={"w": prev}, where=_all)["w"])
    want = reference(w, prev, n, m, axis % ndim)
    np.testing.assert_array_equal(got, want)
    survivors = group_counts(prev, axis, m)
    np.testing.assert_array_equal(group_counts(got, axis, m), np.minimum(survivors, n))
    assert not (got & ~prev).any()  # pruned stays pruned


def _all(path, leaf):
    del path
    return leaf.ndim >= 1


def test_bfloat16_under_strict_promotion_and_jit_compiles_once():
    w = jax.random.normal(jax.random.key(0), (16, 8), jnp.bfloat16)
    fn = jax.jit(nm_masks, static_argnums=(1, 2))
    with jax.numpy_dtype_promotion("strict"), count_compiles() as c:
        first = fn({"kernel": w}, 2, 4)["kernel"]
        second = fn({"kernel": -2 * w}, 2, 4)["kernel"]
    assert c.of("nm_masks") == 1
    np.testing.assert_array_equal(first, second)
    want = reference(np.asarray(w, np.float32), np.ones(w.shape, bool), 2, 4, 0)
    np.testing.assert_array_equal(first, want)


def test_linen_default_axes(linen):
    _, params = linen
    masks = nm_masks(params, 2, 4)
    assert nm_patterns(params, masks) == {
        "Conv_0/kernel": (2, 4),
        "Dense_0/kernel": (2, 4),
        "Dense_1/kernel": (2, 4),
    }
    conv = np.asarray(masks["Conv_0"]["kernel"])
    np.testing.assert_array_equal(group_counts(conv, 2, 4), 2)  # along the in-channels
    assert np.asarray(masks["Dense_0"]["bias"]).all()
    assert all(np.asarray(m).mean() == 0.5 for m in jax.tree.leaves(masks) if m.ndim > 1)


def test_nnx_state_masks_match_the_plain_arrays(nnx_model):
    state = nnx.state(nnx_model, nnx.Param)
    masks = nm_masks(state, 1, 4)
    plain = nm_masks(jax.tree.map(np.asarray, nnx.to_pure_dict(state)), 1, 4)
    for got, want in zip(jax.tree.leaves(masks), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(got, want)
    assert nm_patterns(state, masks) == {"fc1/kernel": (1, 4), "fc2/kernel": (1, 4)}


def test_embedding_groups_features_and_axis_mapping():
    table = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    query = np.random.default_rng(1).normal(size=(8, 2, 3)).astype(np.float32)
    params = {"Embed_0": {"embedding": table}, "attn": {"query": {"kernel": query}}}
    masks = nm_masks(params, 2, 4, axis={"attn/query": 0})
    np.testing.assert_array_equal(group_counts(masks["Embed_0"]["embedding"], 1, 4), 2)
    np.testing.assert_array_equal(group_counts(masks["attn"]["query"]["kernel"], 0, 4), 2)


def test_stacked_layers_get_one_pattern_per_slice():
    w = np.random.default_rng(0).normal(size=(3, 8, 4)).astype(np.float32)
    params = {"layers": {"kernel": w}}
    masks = nm_masks(params, 1, 2, stacked={"layers": 0})
    patterns = nm_patterns(params, masks, stacked={"layers": 0})
    assert patterns == {f"layers/kernel[{i}]": (1, 2) for i in range(3)}
    with pytest.raises(ValueError, match=r"axis 0 of params\['layers/kernel'\] is its stacked"):
        nm_masks(params, 1, 2, axis=0, stacked={"layers": 0})


def test_nm_pattern_detection():
    assert nm_pattern(np.ones((8, 3), bool)) is None
    mask = np.zeros((8, 3), bool)
    mask[::4] = True
    assert nm_pattern(mask) == (1, 4)
    assert nm_pattern(mask[:6], ms=(4,)) is None  # 4 does not divide 6
    assert nm_pattern(np.zeros((4, 2), bool)) == (0, 2)
    with pytest.raises(ValueError, match="axis 5 is out of range"):
        nm_pattern(mask, axis=5)


def test_summarize_reports_the_half_dense_pattern():
    rng = np.random.default_rng(0)
    params = {
        "fc": {"kernel": rng.normal(size=(64, 32)).astype(np.float32)},
        "layers": {"kernel": rng.normal(size=(2, 16, 8)).astype(np.float32)},
    }
    stacked = {"layers": 0}
    summary = jaxprune.summarize(params, nm_masks(params, 2, 4, stacked=stacked), stacked=stacked)
    assert [r.pattern for r in summary.rows] == [(2, 4)] * 3
    assert "N:M" in str(summary) and "2:4" in str(summary)
    one_in_four = jaxprune.summarize(
        params, nm_masks(params, 1, 4, stacked=stacked), stacked=stacked
    )
    assert {r.pattern for r in one_in_four.rows} == {(1, 2)}  # 1 of 4 is also 1 of every 2
    # An unstructured mask at 50% breaks every half-dense pattern on a layer this size.
    han = jaxprune.summarize(params, jaxprune.masks_for_sparsity(params, 0.5, stacked=stacked))
    assert [r.pattern for r in han.rows] == [None, None] and "N:M" not in str(han)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n": 2, "m": 3}, ValueError, r"m=3 does not divide axis 0 of params\['d/kernel'\] "),
        ({"n": 5, "m": 4}, ValueError, r"needs 1 <= n <= m, got n=5, m=4"),
        ({"n": 0, "m": 4}, ValueError, r"needs 1 <= n <= m, got n=0"),
        ({"n": 2.0, "m": 4}, TypeError, r"n must be an int .* got float: 2.0"),
        ({"n": True, "m": 4}, TypeError, r"n must be an int, got the bool"),
        ({"n": 2, "m": 4, "axis": 2}, ValueError, r"axis = 2 is out of range for params\['d/k"),
        ({"n": 2, "m": 4, "axis": {"e*": 0}}, ValueError, r"axis names \['e\*'\], which match"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    params = {"d": {"kernel": np.ones((8, 6), np.float32)}}
    with pytest.raises(error, match=match):
        nm_masks(params, **kwargs)


def test_nan_and_scalar_leaves_are_named():
    with pytest.raises(ValueError, match=r"params\['d/kernel'\] contains NaN or inf"):
        nm_masks({"d": {"kernel": np.full((4, 2), np.nan, np.float32)}}, 2, 4)
    with pytest.raises(ValueError, match=r"params\['s'\] is a scalar"):
        nm_masks({"s": np.float32(1.0)}, 1, 2, where=lambda p, x: True)


# --- composition --------------------------------------------------------------------------------


@pytest.mark.standard_promotion  # optax's Adam / a test model's broadcast bias
def test_keep_pruned_under_adam_keeps_the_pattern(linen):
    model, params = linen
    masks = nm_masks(params, 2, 4)
    params = apply_masks(params, masks)
    tx = keep_pruned(optax.adam(0.05), masks)
    x = jax.random.normal(jax.random.key(1), (8, 4, 4, 4))

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(lambda p: jnp.mean((model.apply({"params": p}, x) - 1.0) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(5):
        params, opt_state = step(params, opt_state)
    for w, keep in zip(jax.tree.leaves(params), jax.tree.leaves(masks), strict=True):
        w = np.asarray(w)
        assert np.all(w[~np.asarray(keep)] == 0) and not np.signbit(w[~np.asarray(keep)]).any()
    assert set(nm_patterns(params, jax.tree.map(lambda w: w != 0, params)).values()) == {(2, 4)}


def test_bcoo_to_dense_save_load_and_sparse_apply(linen, tmp_path):
    model, params = linen
    masks = nm_masks(params, 2, 4)
    pruned = apply_masks(params, masks)
    exported = jaxprune.to_bcoo(pruned, masks)
    kernel = exported["Dense_0"]["kernel"]
    assert isinstance(kernel, BCOO) and kernel.nse == kernel.shape[0] * kernel.shape[1] // 2
    for a, b in zip(
        jax.tree.leaves(jaxprune.to_dense(exported)), jax.tree.leaves(pruned), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    jaxprune.save(tmp_path / "nm.jxp", exported)
    loaded = jaxprune.to_dense(jaxprune.load(tmp_path / "nm.jxp"))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(pruned), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    x = jax.random.normal(jax.random.key(2), (3, 4, 4, 4))
    got = jaxprune.sparse_apply(model, exported, formats="bcoo")(x)
    np.testing.assert_allclose(got, model.apply({"params": pruned}, x), rtol=1e-5, atol=1e-5)


def test_nnx_sparse_apply_matches_masked_dense(nnx_model):
    state = nnx.state(nnx_model, nnx.Param)
    masks = nm_masks(state, 2, 8)
    pruned = apply_masks(state, masks)
    apply = jaxprune.sparse_apply(nnx_model, jaxprune.to_bcoo(pruned, masks), formats="bcoo")
    x = jax.random.normal(jax.random.key(3), (2, 8))
    reference_model = nnx.merge(nnx.graphdef(nnx_model), pruned)
    np.testing.assert_allclose(apply(x), reference_model(x), rtol=1e-5, atol=1e-5)


# --- the round driver ---------------------------------------------------------------------------


def _driver_problem():
    params = {"fc": {"kernel": jax.random.normal(jax.random.key(0), (8, 4)), "bias": jnp.zeros(4)}}
    x = jax.random.normal(jax.random.key(1), (16, 8))

    def loss(p, batch, rng):
        del rng
        return jnp.mean((batch @ p["fc"]["kernel"] + p["fc"]["bias"] - 1.0) ** 2)

    return params, loss, lambda e: [x] * 3


@pytest.mark.standard_promotion  # optax's Adam / a test model's broadcast bias
@pytest.mark.parametrize(
    ("kwargs", "kept"),
    [
        ({"rounds": 1, "pattern": (2, 4)}, [0.5]),
        ({"rounds": 2, "pattern": [(3, 4), (2, 4)]}, [0.75, 0.5]),
        ({"rounds": 2, "sparsity": [0.25, 0.375], "pattern": [None, (2, 4)]}, 0.5),
        ({"rounds": 2, "sparsity": [0.25, 0.625], "pattern": lambda r: (2, 4)}, 0.375),
    ],
)
def test_driver_reaches_the_pattern_without_reviving(kwargs, kept):
    params, loss, batches = _driver_problem()
    runs = list(
        prune_and_retrain(
            params, loss, batches, lambda p: 0.0, optimizer=optax.sgd(0.01, momentum=0.9), **kwargs
        )
    )
    before = None
    for state in runs:
        mask = np.asarray(state.masks["fc"]["kernel"])
        if before is not None:
            assert not (mask & ~before).any()  # never revived
        before = mask
        assert np.all(np.asarray(state.params["fc"]["kernel"])[~mask] == 0)
    last = runs[-1]
    counts = group_counts(last.masks["fc"]["kernel"], 0, 4)
    assert counts.max() <= 2 and last.history[-1].pattern == (2, 4)
    if isinstance(kept, list):  # N:M alone: exactly n per group
        assert [h.kept_fraction for h in last.history] == kept
        assert (counts == 2).all()
    else:  # after an unstructured cut a group may hold fewer than n
        assert last.history[-1].kept_fraction <= kept


def test_driver_pattern_errors():
    params, loss, batches = _driver_problem()

    def run(**kwargs):
        return list(
            prune_and_retrain(
                params,
                loss,
                batches,
                lambda p: 0.0,
                optimizer=optax.sgd(0.01, momentum=0.9),
                **kwargs,
            )
        )

    with pytest.raises(ValueError, match="exactly one of q"):
        run(rounds=1)
    with pytest.raises(ValueError, match=r"pattern has 3 entries, expected rounds=2"):
        run(rounds=2, pattern=[(2, 4)] * 3)
    with pytest.raises(TypeError, match=r"pattern for round 0 must be an \(n, m\) pair"):
        run(rounds=1, pattern=lambda r: 2)
    with pytest.raises(ValueError, match="round 0 has no pattern and neither q nor sparsity"):
        run(rounds=2, pattern=[None, (2, 4)])
    with pytest.raises(ValueError, match=r"m=3 does not divide axis 0 of params\['fc/kernel'\]"):
        run(rounds=1, pattern=(1, 3))


# --- sharding -----------------------------------------------------------------------------------

SHARDED = textwrap.dedent(
    """
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxprune import nm_masks
    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
    w = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)
    want = np.asarray(nm_masks({"kernel": w}, 2, 4)["kernel"])
    sharding = NamedSharding(mesh, P("a", "b"))  # in split into halves of 8: whole groups
    placed = jax.device_put(w, sharding)
    got = jax.jit(nm_masks, static_argnums=(1, 2))({"kernel": placed}, 2, 4)["kernel"]
    np.testing.assert_array_equal(np.asarray(got), want)
    assert got.sharding.is_equivalent_to(sharding, 2), got.sharding
    print("ok")
    """
)


def test_sharded_kernel_keeps_its_sharding():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
