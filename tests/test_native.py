"""The native CSR kernel (jaxprune._native): exact products, its errors, and the fallback."""

import os
import subprocess
import sys

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune import _layouts, _native

needs_kernel = pytest.mark.skipif(
    not _native.available(), reason=f"native kernel unavailable: {_native.why_unavailable()}"
)


def _sparse(rng, shape, density):
    w = rng.standard_normal(shape).astype(np.float32)
    return w * (rng.random(shape) < density)


def _reference(x, w):
    return np.einsum("...k,kn->...n", np.asarray(x, np.float64), w.astype(np.float64))


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    k_in=st.integers(1, 300),
    n_out=st.integers(1, 200),
    lead=hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=19),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_product_matches_dense_for_any_shape_batch_and_density(k_in, n_out, lead, density, seed):
    # Batches of 0 to 361 rows cover the single row, the tiles of 8 and their remainders.
    rng = np.random.default_rng(seed)
    w = _sparse(rng, (k_in, n_out), density)
    x = rng.standard_normal((*lead, k_in)).astype(np.float32)
    got = np.asarray(jax.jit(_native.csr_matmul)(_native.from_dense(w), jnp.asarray(x)))
    assert got.shape == (*lead, n_out) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference(x, w), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_large_products_split_over_threads_and_wide_inputs_use_int32_indices():
    rng = np.random.default_rng(0)
    w = _sparse(rng, (70_000, 64), 0.02)  # K > 65536: int32 indices
    layout = _native.from_dense(w)
    assert layout["idx"].dtype == jnp.int32
    x = rng.standard_normal((33, 70_000)).astype(np.float32)  # 33 x 90K multiply-adds: threads
    np.testing.assert_allclose(
        np.asarray(_native.csr_matmul(layout, jnp.asarray(x))), _reference(x, w), atol=1e-3
    )
    assert _native.from_dense(w[:65_536])["idx"].dtype == jnp.uint16


@needs_kernel
def test_vmap_over_inputs_and_stacked_layouts_indexed_in_a_scan():
    rng = np.random.default_rng(1)
    ws = [_sparse(rng, (30, 20), d) for d in (0.1, 0.5, 0.0)]
    parts = [(*np.nonzero(w), w[np.nonzero(w)]) for w in ws]
    stacked = _layouts.build_stacked("csr", parts, (30, 20))
    x = jnp.asarray(rng.standard_normal((3, 4, 30)).astype(np.float32))

    def body(h, i):
        layout = jax.tree.map(lambda a: a[i], stacked)
        return h, _layouts.matmul("csr", layout, x[i])

    _, out = jax.lax.scan(body, 0.0, jnp.arange(3))
    for i, w in enumerate(ws):
        np.testing.assert_allclose(np.asarray(out[i]), _reference(x[i], w), atol=1e-5)
    one = _native.from_dense(ws[0])
    mapped = jax.vmap(lambda v: _native.csr_matmul(one, v))(x)
    np.testing.assert_allclose(np.asarray(mapped), _reference(x, ws[0]), atol=1e-5)


@needs_kernel
def test_half_precision_inputs_go_through_float32():
    rng = np.random.default_rng(2)
    w = _sparse(rng, (40, 8), 0.3)
    rows, cols = np.nonzero(w)
    layout = _layouts.build("csr", rows, cols, w[rows, cols], w.shape)
    x = jnp.asarray(rng.standard_normal((3, 40)), jnp.bfloat16)
    got = _layouts.matmul("csr", layout, x)
    assert got.dtype == jnp.bfloat16
    want = _reference(np.asarray(x.astype(jnp.float32)), w)
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=2e-2, atol=2e-2)


@needs_kernel
def test_bad_inputs_raise_clear_errors():
    layout = _native.from_dense(np.eye(4, 3, dtype=np.float32))
    with pytest.raises(TypeError, match="x: expected float32 inputs, got int32"):
        _native.csr_matmul(layout, jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 4\) to match the layout"):
        _native.csr_matmul(layout, jnp.ones((2, 5), jnp.float32))
    with pytest.raises(ValueError, match="out of range for a matrix of shape"):
        _native.build(np.array([4]), np.array([0]), np.array([1.0]), (4, 3))
    with pytest.raises(ValueError, match="expected a 2-D"):
        _native.from_dense(np.ones(3))


def _python(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return result.stdout.strip()


FALLBACK = """
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from jaxprune import _native, compute_masks
from jaxprune.sparse import sparse_apply, to_bcoo
model = nn.Dense(1024)
x = jnp.ones((1, 2048))
params = model.init(jax.random.key(0), x)['params']
masks = compute_masks(params, 2.0)  # about 5% kept
apply = sparse_apply(model, to_bcoo(params, masks))
want = model.apply({'params': jax.tree.map(lambda p, m: p * m, params, masks)}, x)
print(_native.why_unavailable(), '|', apply.plan(x)['kernel'], '|',
      bool(np.allclose(apply(x), want, atol=1e-5)))
"""


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({"JAXPRUNE_NATIVE": "0"}, "disabled by JAXPRUNE_NATIVE=0"),
        ({"CXX": "/nonexistent/c++"}, "no C++ compiler found ($CXX, c++, g++, clang++)"),
    ],
)
def test_without_the_kernel_the_rule_falls_back_to_xla_layouts(env, why, tmp_path):
    out = _python(FALLBACK, JAXPRUNE_CACHE_DIR=str(tmp_path), **env)
    assert out == f"{why} | ell | True"  # a 2048x1024 layer at batch 1: the gather layout


@needs_kernel
def test_the_build_is_cached_by_source_and_flags(tmp_path):
    code = "from jaxprune import _native; print(_native.available(), _native._library_path(_native._compiler()))"
    first = _python(code, JAXPRUNE_CACHE_DIR=str(tmp_path))
    assert first.startswith("True ") and first.split()[1].startswith(str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(first.split()[1])]
    assert _python(code, JAXPRUNE_CACHE_DIR=str(tmp_path)) == first  # loaded, not rebuilt
