"""BCOO export, its exact inverse, and jit-compiled sparse inference for Linen and NNX models."""

import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import count_compiles
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.sparse import BCOO
from zoo import NNXCNN

import jaxprune
from jaxprune import _layouts, _native, _products
from jaxprune.masks import compute_masks
from jaxprune.sparse import sparse_apply, to_bcoo, to_dense

# "auto" covers dense at this density; 'csr' only where the native kernel could be built here.
ALL_FORMATS = ("auto", *(f for f in _layouts.SPARSE_FORMATS if f != "csr" or _native.available()))


@pytest.fixture
def xla_only(monkeypatch):
    """The rule as on a machine without the native kernel (no C++ compiler)."""
    monkeypatch.setattr(_native, "available", lambda: False)


@pytest.fixture
def with_native(monkeypatch):
    """The rule as on a machine where the native kernel runs (the rule itself never calls it)."""
    monkeypatch.setattr(_native, "available", lambda: True)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(10)(x)


class LeNet5(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (5, 5), padding="SAME")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 1), kernel_dilation=(1, 2), padding=1)(x))
        x = nn.max_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
        return nn.Dense(10)(nn.relu(nn.Dense(24)(x)))


class NnxNet(nnx.Module):
    def __init__(self, *, conv: bool, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), strides=2, padding="VALID", rngs=rngs) if conv else None
        self.layers = nnx.List([nnx.Linear(36, 20, rngs=rngs), nnx.Linear(20, 5, rngs=rngs)])

    def __call__(self, x):
        if self.conv is not None:
            x = jax.nn.relu(self.conv(x)).reshape(x.shape[0], -1)
        return self.layers[1](jax.nn.relu(self.layers[0](x)))


def _random_tree(abstract, seed=0):
    """Concrete params for an abstract tree; numpy is far quicker than compiling Flax's init."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract)


def _random_masks(params, keep=0.3, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: (rng.random(p.shape) < keep) | (p.ndim < 2), params)


def _masked(params, masks):
    return jax.tree.map(lambda p, m: np.where(m, p, np.zeros((), p.dtype)), params, masks)


def _linen(model, shape):
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, *shape)))["params"]
    params = _random_tree(abstract)
    return params, _random_masks(params)


def _nnx(make):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    return nnx.merge(graphdef, _random_tree(state))


def _assert_close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _flat(tree):
    """``{path: leaf}`` with BCOO kept whole."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda v: isinstance(v, BCOO))
    return {jaxprune._tree.path_str(p): leaf for p, leaf in flat}


def _bits(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


# --- export ---------------------------------------------------------------------------------------

leaf_shapes = st.sampled_from([(3, 4), (1, 7), (2, 3, 2, 5), (5, 1, 3)])


@settings(max_examples=20, deadline=None)
@given(data=st.data(), shape=leaf_shapes, dtype=st.sampled_from([np.float32, np.float16]))
def test_round_trip_is_bit_exact(data, shape, dtype):
    values = data.draw(hnp.arrays(dtype, shape, elements=st.floats(-4, 4, width=16)))
    values = values.copy()
    values.flat[0] = -0.0  # a kept -0.0 must come back as -0.0, not +0.0
    mask = data.draw(hnp.arrays(np.bool_, shape))
    params = {"layer": {"kernel": values, "bias": np.arange(3.0)}}
    masks = {"layer": {"kernel": mask, "bias": np.ones(3, bool)}}

    exported = to_bcoo(params, masks)
    kernel = exported["layer"]["kernel"]
    if mask.all():  # nothing pruned: exported as it is
        assert kernel is values
    else:
        assert isinstance(kernel, BCOO)
        assert (kernel.nse, kernel.n_batch, kernel.n_dense) == (mask.sum(), 0, 0)
        assert kernel.shape == shape and kernel.dtype == dtype
    assert exported["layer"]["bias"] is params["layer"]["bias"]
    back = to_dense(exported)
    expected = _masked(params, masks)
    np.testing.assert_array_equal(
        _bits(back["layer"]["kernel"]), _bits(expected["layer"]["kernel"])
    )
    assert back["layer"]["bias"] is params["layer"]["bias"]
    assert values.flat[0] == 0 and np.signbit(values.flat[0])  # input untouched


def test_unpruned_kernels_stay_dense_and_the_tree_saves_and_runs(tmp_path):
    model = _nnx(lambda rngs: NnxNet(conv=True, rngs=rngs))
    state = nnx.state(model, nnx.Param)
    masks = jax.tree_util.tree_map_with_path(  # layers/1 keeps everything
        lambda p, m: m | ("1" in jaxprune._tree.path_str(p)), _random_masks(state)
    )
    exported = to_bcoo(state, masks)
    kernels = {p: k for p, k in _flat(exported).items() if p.endswith("kernel")}
    assert {p for p, k in kernels.items() if isinstance(k, BCOO)} == {
        "conv/kernel",
        "layers/0/kernel",
    }
    assert not isinstance(kernels["layers/1/kernel"], BCOO)
    jaxprune.save(tmp_path / "m.jaxprune", exported)
    back = to_dense(jaxprune.load(tmp_path / "m.jaxprune"))
    for got, want in zip(
        jax.tree.leaves(back), jax.tree.leaves(_masked(state, masks)), strict=True
    ):
        np.testing.assert_array_equal(_bits(got), _bits(want))
    x = jax.random.normal(jax.random.key(2), (3, 7, 7, 1))
    reference = nnx.merge(nnx.graphdef(model), _masked(state, masks))
    _assert_close(sparse_apply(model, exported, formats="bcsr")(x), reference(x))


def test_to_bcoo_rejects_masks_of_another_shape():
    params, masks = _linen(MLP(), (8,))
    masks["Dense_1"]["kernel"] = masks["Dense_1"]["kernel"][:, :3]
    with pytest.raises(ValueError, match=r"masks\['Dense_1/kernel'\] has shape \(32, 3\)"):
        to_bcoo(params, masks)


def test_to_bcoo_rejects_missing_leaves():
    params, masks = _linen(MLP(), (8,))
    del masks["Dense_2"]
    with pytest.raises(ValueError, match=r"missing leaves.*Dense_2/bias"):
        to_bcoo(params, masks)


def test_to_bcoo_rejects_non_boolean_mask():
    params, masks = _linen(MLP(), (8,))
    masks["Dense_0"]["kernel"] = masks["Dense_0"]["kernel"].astype(np.float32)
    with pytest.raises(
        TypeError, match=r"masks\['Dense_0/kernel'\] has dtype float32, expected bool"
    ):
        to_bcoo(params, masks)


def test_to_bcoo_rejects_pruning_of_a_leaf_it_does_not_export():
    params, masks = _linen(MLP(), (8,))
    masks["Dense_0"]["bias"][0] = False
    with pytest.raises(ValueError, match=r"masks\['Dense_0/bias'\] prunes entries"):
        to_bcoo(params, masks)


def test_to_bcoo_rejects_tracers():
    params, masks = _linen(MLP(), (8,))
    with pytest.raises(TypeError, match=r"params\['Dense_0/bias'\] is a tracer"):
        jax.jit(to_bcoo)(params, masks)


# --- inference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("formats", ALL_FORMATS)
def test_linen_mlp_matches_masked_dense(formats):
    model = MLP()
    params, masks = _linen(model, (8,))
    apply = sparse_apply(model, to_bcoo(params, masks), formats=formats)
    for batch in (1, 9):
        x = jax.random.normal(jax.random.key(batch), (batch, 8))
        _assert_close(apply(x), model.apply({"params": _masked(params, masks)}, x))


@pytest.mark.parametrize("formats", ALL_FORMATS)
def test_linen_cnn_matches_masked_dense(formats):
    model = LeNet5()
    params, masks = _linen(model, (16, 16, 1))
    apply = sparse_apply(model, to_bcoo(params, masks), formats=formats)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
    _assert_close(apply(x), model.apply({"params": _masked(params, masks)}, x))


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("formats", ALL_FORMATS)
def test_nnx_model_matches_masked_dense(conv, formats):
    model = _nnx(lambda rngs: NnxNet(conv=conv, rngs=rngs))
    state = nnx.state(model, nnx.Param)
    masks = _random_masks(state)
    kernel_before = np.asarray(model.layers[0].kernel[...]).copy()
    apply = sparse_apply(model, to_bcoo(state, masks), formats=formats)
    x = jax.random.normal(jax.random.key(2), (3, 7, 7, 1) if conv else (3, 36))
    reference = nnx.merge(nnx.graphdef(model), _masked(state, masks))
    _assert_close(apply(x), reference(x))
    # the user's model is untouched: same kernel values, same hook
    np.testing.assert_array_equal(np.asarray(model.layers[0].kernel[...]), kernel_before)
    assert model.layers[0].dot_general is jax.lax.dot_general


def test_linen_other_collections_and_call_kwargs_are_passed():
    class WithNorm(nn.Module):
        @nn.compact
        def __call__(self, x, *, scale):
            x = nn.BatchNorm(use_running_average=True)(nn.Dense(12)(x))
            return scale * nn.Dense(3)(x)

    model = WithNorm()
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 6)), scale=1.0))
    variables = _random_tree(abstract)
    variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])  # var > 0
    masks = _random_masks(variables["params"])
    apply = sparse_apply(
        model,
        to_bcoo(variables["params"], masks),
        formats="bcsr",
        variables={"batch_stats": variables["batch_stats"]},
        apply_kwargs={"scale": 2.0},
    )
    x = jax.random.normal(jax.random.key(0), (4, 6))
    want = model.apply({**variables, "params": _masked(variables["params"], masks)}, x, scale=2.0)
    _assert_close(apply(x), want)


def test_linen_model_is_not_mutated_and_calibrate_runs():
    model = MLP()
    params, masks = _linen(model, (8,))
    apply = sparse_apply(model, to_bcoo(params, masks), formats="calibrate")
    x = jax.random.normal(jax.random.key(0), (4, 8))
    _assert_close(apply(x), model.apply({"params": _masked(params, masks)}, x))
    assert set(apply.plan(x).values()) <= set(_layouts.FORMATS)

    dense = nn.Dense(5)  # the hook is swapped on apply's bound clone, never on the user's module
    params, masks = _linen(dense, (8,))
    sparse_apply(dense, to_bcoo(params, masks), formats="ell")(x)
    assert dense.dot_general is None and dense.dot_general_cls is None


@settings(max_examples=6, deadline=None)
@given(
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    strides=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    lhs_dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    rhs_dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    pads=st.tuples(*[st.integers(0, 2)] * 4),
)
def test_im2col_times_kernel_is_the_convolution(kernel, strides, lhs_dilation, rhs_dilation, pads):
    rng = np.random.default_rng(0)
    lhs = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
    rhs = rng.standard_normal((*kernel, 3, 4)).astype(np.float32)
    padding = ((pads[0], pads[1]), (pads[2], pads[3]))

    @jax.jit
    def both(lhs, rhs):
        want = jax.lax.conv_general_dilated(
            lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, ("NHWC", "HWIO", "NHWC")
        )
        patches = _products.im2col(lhs, kernel, strides, padding, lhs_dilation, rhs_dilation)
        return patches @ rhs.reshape(-1, 4), want

    _assert_close(*both(lhs, rhs))


def test_unsupported_linen_layer_is_named():
    class WithTranspose(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.ConvTranspose(4, (3, 3))(nn.Dense(6)(x).reshape(-1, 2, 3, 1))

    model = WithTranspose()
    params, masks = _linen(model, (5,))
    apply = sparse_apply(model, to_bcoo(params, masks))
    with pytest.raises(ValueError, match=r"'ConvTranspose_0' \(ConvTranspose\) holds pruned"):
        apply(jnp.ones((1, 5)))


def test_unsupported_linen_raw_param_is_named():
    class Raw(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x @ self.param("w", nn.initializers.normal(), (5, 3))

    params, masks = _linen(Raw(), (5,))
    apply = sparse_apply(Raw(), to_bcoo(params, masks, where=jaxprune.paths_matching("w")))
    with pytest.raises(ValueError, match=r"'<root>' \(Raw\) holds pruned weights \['w'\]"):
        apply(jnp.ones((1, 5)))


def test_unsupported_nnx_layer_is_named_eagerly():
    class WithTranspose(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.ConvTranspose(1, 4, (3, 3), rngs=rngs)

        def __call__(self, x):
            return self.up(x)

    model = _nnx(WithTranspose)
    state = nnx.state(model, nnx.Param)
    with pytest.raises(
        ValueError, match=r"'up' \(ConvTranspose\) holds pruned weights \['kernel'\]"
    ):
        sparse_apply(model, to_bcoo(state, _random_masks(state)))


def test_bad_formats_are_rejected():
    model = MLP()
    exported = to_bcoo(*_linen(model, (8,)))
    with pytest.raises(ValueError, match="formats='csc' is not one of"):
        sparse_apply(model, exported, formats="csc")
    with pytest.raises(ValueError, match=r"formats\['Dense_9/kernel'\] names no pruned kernel"):
        sparse_apply(model, exported, formats={"Dense_9/kernel": "ell"})
    with pytest.raises(TypeError, match=r"model must be a flax\.linen Module"):
        sparse_apply(lambda x: x, exported)


def test_asking_for_csr_without_the_native_kernel_is_refused(monkeypatch):
    monkeypatch.setattr(_native, "why_unavailable", lambda: "no C++ compiler found")
    model = MLP()
    exported = to_bcoo(*_linen(model, (8,)))
    with pytest.raises(ValueError, match=r"formats = 'csr' needs .*native.*no C\+\+ compiler"):
        sparse_apply(model, exported, formats="csr")
    with pytest.raises(ValueError, match=r"formats\['Dense_0/kernel'\] = 'csr' needs"):
        sparse_apply(model, exported, formats={"Dense_0/kernel": "csr"})


def test_no_recompilation_for_same_shapes():
    model = MLP()
    params, masks = _linen(model, (8,))
    apply = sparse_apply(model, to_bcoo(params, masks), formats="bcsr")
    inputs = [jax.random.normal(jax.random.key(seed), (4, 8)) for seed in range(3)]
    host, wider, wider_too = np.ones((4, 8), np.float32), jnp.ones((5, 8)), jnp.zeros((5, 8))
    apply(inputs[0])
    apply(host)  # the first numpy input converts (compiles a transfer) once
    with count_compiles() as compiles:
        for x in (*inputs[1:], host):
            apply(x)
    assert compiles.names == []
    with count_compiles() as compiles:
        apply(wider)  # a new shape compiles, then reuses its executable
    assert compiles.names
    with count_compiles() as compiles:
        apply(wider_too)
    assert compiles.names == []


# --- automatic choice -----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    density=st.floats(0.0, 1.0),
    rows=st.integers(1, 10_000),
    shape=st.tuples(st.integers(1, 5000), st.integers(1, 5000)),
)
def test_rule_is_dense_at_high_density_or_tiny_layers(density, rows, shape):
    with pytest.MonkeyPatch.context() as patch:  # the rule as without the native kernel
        patch.setattr(_native, "available", lambda: False)
        fmt = _layouts.choose(_layouts.Product(density, rows, shape))
    assert fmt in _layouts.FORMATS and fmt != "bcoo"
    if density > max(_layouts.ELL_MAX_DENSITY, _layouts.BCSR_MAX_DENSITY):
        assert fmt == "dense"
    if shape[0] * shape[1] < _layouts.MIN_SPARSE_SIZE:
        assert fmt == "dense"
    if fmt == "ell":
        assert rows == 1
    if rows < _layouts.SMALL_BATCH_ROWS and shape[0] * shape[1] < _layouts.LARGE_LAYER_SIZE:
        assert fmt == "dense"  # small networks at small batch are dispatch-bound


def test_auto_plan_picks_dense_when_dense_and_sparse_when_sparse(xla_only):
    model = nn.Dense(1024)
    params, _ = _linen(model, (1024,))
    dense_apply = sparse_apply(model, to_bcoo(params, _random_masks(params, keep=0.5)))
    sparse = sparse_apply(model, to_bcoo(params, _random_masks(params, keep=0.05)))
    for batch in (1, 64, 1024):
        assert dense_apply.plan(jnp.ones((batch, 1024))) == {"kernel": "dense"}
    assert sparse.plan(jnp.ones((1, 1024))) == {"kernel": "ell"}
    assert sparse.plan(jnp.ones((64, 1024))) == {"kernel": "bcsr"}
    assert sparse.plan(jnp.ones((1024, 1024))) == {"kernel": "bcsr"}  # 5%: BCSR at any batch
    middling = sparse_apply(model, to_bcoo(params, _random_masks(params, keep=0.1)))
    assert middling.plan(jnp.ones((64, 1024))) == {"kernel": "bcsr"}
    assert middling.plan(jnp.ones((1024, 1024))) == {"kernel": "dense"}
    assert sparse.nbytes(jnp.ones((1, 1024))) < 0.2 * 1024 * 1024 * 4
    small = nn.Dense(100)  # 784 x 100 weights, all sparse: BCSR at batch 1 too
    params, _ = _linen(small, (784,))
    small_apply = sparse_apply(small, to_bcoo(params, _random_masks(params, keep=0.05)))
    assert small_apply.plan(jnp.ones((1, 784))) == {"kernel": "bcsr"}
    assert small_apply.plan(jnp.ones((64, 784))) == {"kernel": "bcsr"}


def test_small_batch_plan_is_all_sparse_or_keeps_small_layers_dense(xla_only):
    P = _layouts.Product
    lenet = {
        "fc1": P(0.08, 1, (784, 300)),
        "fc2": P(0.09, 1, (300, 100)),
        "fc3": P(0.1, 1, (100, 10)),
    }
    assert set(_layouts.choose_plan(lenet).values()) == {"bcsr"}
    lenet["fc3"] = P(0.266, 1, (100, 10))  # Han et al. 2015, Table 2: fc3 keeps 26.6%
    assert set(_layouts.choose_plan(lenet).values()) == {"dense"}
    lenet = {path: p._replace(rows=64) for path, p in lenet.items()}
    assert _layouts.choose_plan(lenet) == {"fc1": "bcsr", "fc2": "bcsr", "fc3": "dense"}
    wide = {"w": P(0.11, 1, (4096, 4096))}  # a large layer keeps its own rule at batch 1
    assert _layouts.choose_plan(wide) == {"w": "ell"}
    wide = {"w": P(0.2, 1, (4096, 4096)), "fc": P(0.05, 1, (784, 300))}
    assert _layouts.choose_plan(wide) == {"w": "dense", "fc": "dense"}
    # A convolution, a lookup or a stacked slice stays dense (small stacked ones), and the model's
    # small layers then keep their own rule.
    mixed = {"conv": P(0.05, 1, (576, 64), "conv"), "fc": P(0.05, 1, (784, 300))}
    assert _layouts.choose_plan(mixed) == {"conv": "dense", "fc": "dense"}
    stacked = {"blocks": P(0.05, 64, (512, 512), stacked=True), "fc": P(0.05, 64, (784, 300))}
    assert _layouts.choose_plan(stacked) == {"blocks": "dense", "fc": "bcsr"}


@settings(max_examples=30, deadline=None)
@given(
    density=st.floats(0.0, 1.0),
    rows=st.integers(1, 10_000),
    shape=st.tuples(st.integers(1, 5000), st.integers(1, 5000)),
    dtype=st.sampled_from(["float32", "bfloat16", "float64"]),
)
def test_rule_takes_the_native_kernel_only_at_small_batch_in_float32(density, rows, shape, dtype):
    product = _layouts.Product(density, rows, shape, dtype=dtype)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_native, "available", lambda: True)
        fmt = _layouts.choose(product)
        patch.setattr(_native, "available", lambda: False)
        assert _layouts.choose(product) != "csr"
    wants_csr = (
        dtype == "float32"
        and rows <= _layouts.CSR_MAX_ROWS
        and density <= _layouts.csr_max_density(rows)
        and shape[0] * shape[1] >= _layouts.MIN_SPARSE_SIZE
    )
    assert (fmt == "csr") == wants_csr


def test_native_plan_for_lenet_at_small_batch(with_native):
    P = _layouts.Product
    lenet = {
        "fc1": P(0.08, 1, (784, 300)),
        "fc2": P(0.09, 1, (300, 100)),
        "fc3": P(0.1, 1, (100, 10)),
    }
    assert set(_layouts.choose_plan(lenet).values()) == {"csr"}
    lenet["fc3"] = P(0.266, 1, (100, 10))  # Han et al. 2015, Table 2: the tiny layer stays dense
    assert _layouts.choose_plan(lenet) == {"fc1": "csr", "fc2": "csr", "fc3": "dense"}
    lenet = {path: p._replace(rows=64) for path, p in lenet.items()}  # BCSR's regime
    assert _layouts.choose_plan(lenet) == {"fc1": "bcsr", "fc2": "bcsr", "fc3": "dense"}
    conv = {"conv": P(0.05, 1, (576, 64), "conv"), "fc": P(0.05, 1, (784, 300))}
    assert _layouts.choose_plan(conv) == {"conv": "dense", "fc": "csr"}
    # 20% kept: the kernel for one row, not for 8 (0.90-1.30x dense there).
    wide = P(0.2, 1, (4096, 4096))
    assert _layouts.choose_plan({"w": wide}) == {"w": "csr"}
    assert _layouts.choose_plan({"w": wide._replace(rows=8)}) == {"w": "dense"}
    assert _layouts.choose_plan({"w": wide._replace(rows=8, density=0.08)}) == {"w": "csr"}


def test_every_layout_computes_the_product():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 30)).astype(np.float32) * (rng.random((40, 30)) < 0.2)
    rows, cols = np.nonzero(w)
    x = jnp.asarray(rng.standard_normal((5, 40)).astype(np.float32))
    for fmt in (*ALL_FORMATS[1:], "dense"):
        layout = _layouts.build(fmt, rows, cols, w[rows, cols], w.shape)
        _assert_close(jax.jit(lambda lay, v, f=fmt: _layouts.matmul(f, lay, v))(layout, x), x @ w)


class WideConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(64, (3, 3), padding="SAME")(x)  # 36,864 weights: large enough for BCSR
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def test_auto_rule_keeps_convolutions_dense(xla_only):
    model = WideConv()
    params, _ = _linen(model, (8, 8, 64))
    masks = _random_masks(params, keep=0.05)
    apply = sparse_apply(model, to_bcoo(params, masks))
    x = jnp.ones((1, 8, 8, 64))
    # 64 rows at 5% would pick BCSR for a Dense layer of this size (see the rule just below).
    assert _layouts.choose(_layouts.Product(0.05, 64, (576, 64))) == "bcsr"
    assert apply.plan(x)["Conv_0/kernel"] == "dense"
    _assert_close(apply(x), model.apply({"params": _masked(params, masks)}, x))


class _Recorded:
    """A layer's own convolution that records each call (at trace time) and runs XLA's."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return jax.lax.conv_general_dilated(*args, **kwargs)


@pytest.mark.parametrize("kind", ["linen", "linen_cls", "nnx"])
def test_a_dense_planned_conv_runs_the_layers_own_convolution(kind):
    # The unpruned model's convolution (fast_conv, say) is what a dense plan runs, not XLA's.
    own, x = _Recorded(), jnp.ones((2, 8, 8, 3))
    if kind == "nnx":
        model = nnx.Conv(3, 5, (3, 3), conv_general_dilated=own, rngs=nnx.Rngs(0))
        state = nnx.state(model, nnx.Param)
        masks = compute_masks(state, 0.8)
        exported = to_bcoo(state, masks)
        nnx.update(model, to_dense(exported))
        reference = model(x)
    else:
        conv = {"conv_general_dilated_cls": lambda: own} if kind == "linen_cls" else {}
        model = nn.Conv(5, (3, 3), **(conv or {"conv_general_dilated": own}))
        params = model.init(jax.random.key(0), x)["params"]
        exported = to_bcoo(params, compute_masks(params, 0.8))
        reference = model.apply({"params": to_dense(exported)}, x)
    calls = {}
    for fmt in ("dense", "bcoo"):  # both trace the model once abstractly with a dense plan
        own.calls = 0
        _assert_close(sparse_apply(model, exported, formats=fmt)(x), reference)
        calls[fmt] = own.calls
    assert calls["dense"] > calls["bcoo"], calls


def test_nnx_model_in_train_mode_is_refused():
    model = NNXCNN(nnx.Rngs(0))  # Dropout and BatchNorm
    state = nnx.state(model, nnx.Param)
    exported = to_bcoo(state, _random_masks(state))
    model.train()
    with pytest.raises(ValueError, match=r"in train mode: \['bn1 \(BatchNorm\)'.*model.eval\(\)"):
        sparse_apply(model, exported)
    model.eval()
    out = sparse_apply(model, exported)(jnp.ones((2, 8, 8, 1)))
    assert out.shape == (2, 10)
