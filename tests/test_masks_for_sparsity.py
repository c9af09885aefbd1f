"""masks_for_sparsity against a reference that sorts: exact equality of masks, ties included."""

import functools
import math
import threading

import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import jaxprune
from jaxprune._tree import leaves_with_paths

# --- the reference: rank by (|w| as float32, flattening order) with numpy's stable argsort ------


def reference_keep(magnitudes: np.ndarray, alive: np.ndarray, n_pruned: int) -> np.ndarray:
    """Keeps all but the n_pruned lowest of a 1-D array; pruned first, then |w|, then position."""
    order = np.lexsort((np.arange(magnitudes.size), magnitudes, alive))
    keep = np.ones(magnitudes.size, bool)
    keep[order[:n_pruned]] = False
    return keep & alive


def reference_masks(kernels, sparsity, scope, previous, axis=None):
    """Masks of a list of kernels by sorting; ``axis`` ranks the first kernel per slice."""
    mags = [np.abs(np.asarray(k, np.float32)) for k in kernels]
    if scope == "global":
        flat = reference_keep(
            np.concatenate([m.ravel() for m in mags]),
            np.concatenate([p.ravel() for p in previous]),
            math.floor(sparsity * sum(m.size for m in mags) + 0.5),
        )
        splits = np.cumsum([m.size for m in mags])[:-1]
        return [f.reshape(m.shape) for f, m in zip(np.split(flat, splits), mags, strict=True)]
    out = []
    for m, p in zip(mags, previous, strict=True):
        rows, alive = (m[None], p[None]) if axis is None else (m, p)
        if axis is not None:
            rows, alive = np.moveaxis(m, axis, 0), np.moveaxis(p, axis, 0)
        n = math.floor(sparsity * rows[0].size + 0.5)
        keep = np.stack(
            [reference_keep(r.ravel(), a.ravel(), n) for r, a in zip(rows, alive, strict=True)]
        ).reshape(rows.shape)
        out.append(keep[0] if axis is None else np.moveaxis(keep, 0, axis))
    return out


# Few distinct values (ties), zeros and negative zeros. XLA on CPU flushes subnormals, so none.
values = st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0, 3.25, -7.0, 1e-30, 1e30])
# A few fixed shapes, so the compiled ranking is reused across examples.
kernel_of = st.sampled_from([(7,), (3, 4), (2, 1, 3)]).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=values)
)
sparsities = st.one_of(st.sampled_from([0.0, 0.5, 0.99]), st.floats(0, 0.999))


def params_of(kernels):
    return {
        f"Dense_{i}": {"kernel": k, "bias": np.ones(2, np.float32)} for i, k in enumerate(kernels)
    }


def kernel_masks(masks, n):
    return [np.asarray(masks[f"Dense_{i}"]["kernel"]) for i in range(n)]


@settings(max_examples=12)
@given(
    st.lists(kernel_of, min_size=1, max_size=2),
    sparsities,
    st.sampled_from(["layer", "global"]),
    st.booleans(),
    st.data(),
)
def test_equals_the_sorting_reference(kernels, sparsity, scope, with_previous, data):
    params = params_of(kernels)
    previous = [np.ones(k.shape, bool) for k in kernels]
    prev_tree = None
    if with_previous:
        previous = [data.draw(hnp.arrays(bool, k.shape)) for k in kernels]
        prev_tree = jax.tree.map(lambda x: np.ones(x.shape, bool), params)
        for i, p in enumerate(previous):
            prev_tree[f"Dense_{i}"]["kernel"] = p
    got = kernel_masks(
        jaxprune.masks_for_sparsity(params, sparsity, scope=scope, previous=prev_tree),
        len(kernels),
    )
    want = reference_masks(kernels, sparsity, scope, previous)
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g, w)


@settings(max_examples=10)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=4),
        elements=values,
    ),
    st.sampled_from([0, 2]),
    sparsities,
    st.data(),
)
def test_stacked_slices_equal_the_reference(kernel, axis, sparsity, data):
    params = {"layers": {"kernel": kernel}}
    previous = data.draw(hnp.arrays(bool, kernel.shape))
    got = jaxprune.masks_for_sparsity(
        params, sparsity, previous={"layers": {"kernel": previous}}, stacked={"layers": axis}
    )["layers"]["kernel"]
    (want,) = reference_masks([kernel], sparsity, "layer", [previous], axis=axis)
    assert np.array_equal(np.asarray(got), want)


def test_float64_and_bfloat16_rank_by_their_float32_magnitude():
    # 1 + 1e-12 and 1 are one float32: tied, so position decides (the earlier is pruned).
    params = {"kernel": np.array([1.0 + 1e-12, 1.0, 3.0, 0.5])}
    assert np.asarray(jaxprune.masks_for_sparsity(params, 0.5)["kernel"]).tolist() == [
        False,
        True,
        True,
        False,
    ]
    bf16 = {"kernel": jax.numpy.asarray([2.0, -1.0, 1.0, -0.0], jax.numpy.bfloat16)}
    assert np.asarray(jaxprune.masks_for_sparsity(bf16, 0.75)["kernel"]).tolist() == [
        True,
        False,
        False,
        False,
    ]


# --- per-layer sparsity mapping -------------------------------------------------------------


def test_mapping_by_leaf_layer_pattern_and_slice():
    rng = np.random.default_rng(0)
    params = {
        "Dense_0": {"kernel": rng.normal(size=(4, 5)).astype(np.float32)},
        "Dense_1": {"kernel": rng.normal(size=(4, 5)).astype(np.float32)},
        "Conv_0": {"kernel": rng.normal(size=(4, 5)).astype(np.float32)},
        "layers": {"kernel": rng.normal(size=(3, 4, 5)).astype(np.float32)},
    }
    masks = jaxprune.masks_for_sparsity(
        params,
        {"Dense_*": 0.5, "Dense_1/kernel": 0.25, "layers/kernel[1]": 0.75},
        stacked={"layers": 0},
    )
    pruned = {
        p: int((~np.asarray(m)).sum((-2, -1)))
        if m.ndim == 2
        else (~np.asarray(m)).sum((-2, -1)).tolist()
        for p, m in leaves_with_paths(masks)
    }
    assert pruned == {
        "Conv_0/kernel": 0,  # not named: not pruned
        "Dense_0/kernel": 10,  # the pattern
        "Dense_1/kernel": 5,  # the exact name wins
        "layers/kernel": [0, 15, 0],  # one slice named
    }


@pytest.mark.parametrize(
    ("sparsity", "scope", "match"),
    [
        ({"Dense_9": 0.5}, "layer", r"sparsity names \['Dense_9'\], which match no prunable"),
        ({"Dense_0": 1.0}, "layer", r"sparsity\['Dense_0'\] must be finite and in \[0.0, 1.0\)"),
        ({"Dense_0": 0.5}, "global", r"a sparsity mapping needs scope='layer'"),
    ],
)
def test_bad_mapping(sparsity, scope, match):
    params = {"Dense_0": {"kernel": np.ones((2, 2), np.float32)}}
    with pytest.raises(ValueError, match=match):
        jaxprune.masks_for_sparsity(params, sparsity, scope=scope)


def test_jit_and_vmap_over_the_sparsity_compile_once():
    params = params_of([np.random.default_rng(1).normal(size=(8, 8)).astype(np.float32)])
    traces = []

    @jax.jit
    def kept(params, s):
        traces.append(1)
        masks = jaxprune.masks_for_sparsity(params, s, scope="global")
        return masks["Dense_0"]["kernel"].sum()

    assert [int(kept(params, s)) for s in (0.25, 0.5)] == [48, 32] and len(traces) == 1
    grid = jax.vmap(lambda s: jaxprune.masks_for_sparsity(params, s)["Dense_0"]["kernel"].sum())
    assert np.asarray(grid(np.array([0.0, 0.5, 0.9], np.float32))).tolist() == [64, 32, 6]


# --- large layers: the sampled start and the grouped counts --------------------------------------


@settings(max_examples=6, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    sparsities,
    st.sampled_from(["normal", "few values", "tiny"]),
    st.sampled_from(["layer", "global", "stacked"]),
    st.booleans(),
)
def test_large_layers_equal_the_sorting_reference(seed, sparsity, kind, scope, with_previous):
    # 2**16 weights or more per ranked slice start from a sample's quantiles; dimensions of a
    # multiple of 256 are counted in uint8 groups. Ties (few values) and a misleading sample
    # (tiny magnitudes, previous masks) must not change the answer.
    rng = np.random.default_rng(seed)
    shape = (2, 256, 256) if scope == "stacked" else (256, 384)
    kernel = rng.normal(size=shape)
    if kind == "few values":
        kernel = np.round(kernel * 2) / 2
    elif kind == "tiny":
        kernel = kernel * 1e-35
    kernel = kernel.astype(np.float32)
    previous = rng.random(shape) > 0.25 if with_previous else np.ones(shape, bool)
    if scope == "stacked":
        got = jaxprune.masks_for_sparsity(
            {"layers": {"kernel": kernel}},
            sparsity,
            previous={"layers": {"kernel": previous}},
            stacked={"layers": 0},
        )["layers"]["kernel"]
        (want,) = reference_masks([kernel], sparsity, "layer", [previous], axis=0)
        assert np.array_equal(np.asarray(got), want)
        return
    kernels = [kernel, kernel[:, :100] * 3]
    params = params_of(kernels)
    prev_tree = jax.tree.map(lambda x: np.ones(x.shape, bool), params)
    prevs = [previous, previous[:, :100]]
    for i, p in enumerate(prevs):
        prev_tree[f"Dense_{i}"]["kernel"] = p
    masks = jaxprune.masks_for_sparsity(params, sparsity, scope=scope, previous=prev_tree)
    want = reference_masks(kernels, sparsity, scope, prevs)
    for g, w in zip(kernel_masks(masks, 2), want, strict=True):
        assert np.array_equal(g, w)


@settings(max_examples=8, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    sparsities,
    st.sampled_from(["normal", "uniform", "clustered"]),
    st.sampled_from(["layer", "global"]),
    st.booleans(),
)
@example(seed=0, sparsity=0.5, kind="clustered", scope="layer", with_previous=False)  # overflows
def test_candidate_blocks_equal_the_sorting_reference(seed, sparsity, kind, scope, with_previous):
    # On one device, a ranked set of 2**16 weights or more is searched among the blocks that hold
    # the start's bracket. A short last block (263 * 257 weights), a small leaf taken whole
    # (global scope), magnitudes at a power of two (uniform: more interpolation passes) and a
    # cluster a few ulps wide that overflows the blocks' share (the bisection over every weight
    # answers then) must all give the sort's answer.
    rng = np.random.default_rng(seed)
    shape = (263, 257)
    if kind == "normal":
        kernel = rng.normal(size=shape)
    elif kind == "uniform":
        kernel = rng.uniform(-1, 1, size=shape)
    else:
        kernel = rng.normal(size=shape)
        cluster = rng.random(shape) < 0.4
        kernel[cluster] = 1.0 + rng.integers(0, 64, size=cluster.sum()) * 2.0**-23
    kernels = [kernel.astype(np.float32), rng.normal(size=(5, 9)).astype(np.float32)]
    prevs = [
        rng.random(k.shape) > 0.25 if with_previous else np.ones(k.shape, bool) for k in kernels
    ]
    params = params_of(kernels)
    prev_tree = jax.tree.map(lambda x: np.ones(x.shape, bool), params)
    for i, p in enumerate(prevs):
        prev_tree[f"Dense_{i}"]["kernel"] = p
    masks = jaxprune.masks_for_sparsity(params, sparsity, scope=scope, previous=prev_tree)
    want = reference_masks(kernels, sparsity, scope, prevs)
    for g, w in zip(kernel_masks(masks, 2), want, strict=True):
        assert np.array_equal(g, w)


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(bool, st.sampled_from([1, 5, 127, 128, 129, 700])), st.data())
def test_first_true_is_nonzero_padded(flags, data):
    # A few fixed sizes (rows of 128 whole, short and one past), so few compilations.
    from jaxprune._blocks import _first_true

    cap = data.draw(st.sampled_from(sorted({1, flags.size // 2 or 1, flags.size})))
    want = np.nonzero(flags)[0][:cap]
    want = np.concatenate([want, np.full(cap - want.size, flags.size)])
    got = jax.jit(_first_true, static_argnums=1)(flags, cap)
    assert np.array_equal(np.asarray(got), want)


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from([1, 15, 16, 130, 2049]),
    st.sampled_from([16, 128]),
    st.sampled_from([1, 3]),
    st.integers(0, 2**32 - 1),
)
def test_block_counts_flag_the_blocks_between_two_keys(n, counted, per, seed):
    # Each counting pass on one device also counts per block of `counted` entries; a candidate
    # block (`per` of those, the last of each possibly short) is flagged where the counts at the
    # bracket's two ends differ, i.e. where it holds a key in (lo, hi].
    from jaxprune._blocks import _block_counts, _flagged

    @functools.partial(jax.jit, static_argnums=(3, 4))
    def flagged(keys, lo, hi, counted, per, raw=None):
        at_lo, at_hi, *bad = _block_counts(keys, lo, hi, counted, raw)
        return jax.numpy.sum(at_hi, dtype=np.int32), _flagged(at_lo, at_hi, per), bad

    rng = np.random.default_rng(seed)
    keys = rng.integers(-1, 40, size=n).astype(np.int32)
    lo, hi = sorted(rng.integers(-2, 41, size=2).tolist())
    size = counted * per
    want = [np.any((b > lo) & (b <= hi)) for b in np.split(keys, range(size, n, size))]
    # With flags (every other example: one compile each), a third count rides along: the
    # flags set (the NaN and inf weights, in the ranking).
    raw = rng.random(n) < 0.3
    extra = raw if seed % 2 else None
    count_hi, flags, bad = flagged(keys, np.int32(lo), np.int32(hi), counted, per, extra)
    assert int(count_hi) == np.sum(keys <= hi)
    assert np.asarray(flags).tolist() == want
    assert [int(b) for b in bad] == ([] if extra is None else [np.sum(raw)])


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([16, 128]), st.integers(0, 2**32 - 1))
def test_candidate_pieces_hold_every_key_in_the_bracket_or_say_they_do_not_fit(size, seed):
    # A split leaf's candidates: of the flagged blocks, the pieces of 16 entries holding keys
    # in (lo, hi]. They hold exactly those keys when they fit, and they fit whenever at most
    # `cap` keys lie in the bracket (and so at most `cap` blocks or pieces hold one).
    from jaxprune._blocks import _KEY_MAX, _candidate_keys
    from jaxprune._keys import _keys

    rng = np.random.default_rng(seed)
    blocks, cap = 64, int(rng.choice([2, 8, 16]))
    x = rng.normal(size=blocks * size).astype(np.float32)
    if seed % 3 == 0:  # runs of equal magnitudes, so a block may hold many keys of the bracket
        x = np.round(x * 4) / 4
    prev = rng.random(x.size) > 0.2 if seed % 2 else None
    key = np.asarray(_keys(x, prev))
    ranked = np.sort(key)  # a bracket of about 0 to 3 * cap entries
    start = int(rng.integers(0, key.size))
    lo, hi = ranked[start], ranked[min(start + int(rng.integers(0, 3 * cap)), key.size - 1)]
    inside = (key > lo) & (key <= hi)
    flags = inside.reshape(blocks, size).any(axis=1)
    candidates = jax.jit(_candidate_keys, static_argnums=(5, 6, 7))
    got, fits = candidates(x, prev, flags, np.int32(lo), np.int32(hi), size, cap, True)
    got = np.asarray(got)
    assert got.shape == (cap, min(size, 16))
    if inside.sum() <= cap:
        assert bool(fits)
    if bool(fits):
        assert sorted(got[got != _KEY_MAX].tolist()) == sorted(key[inside].tolist())


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([(5,), (300,), (16, 40), (512, 24), (256, 128), (7, 256, 9), (2, 512, 32)]),
    st.data(),
)
def test_count_per_layer_and_per_slice(shape, data):
    # Counting sums groups of 16, then of 8 along the minor dimension, as uint8 (at most 128
    # each: no overflow even where every entry is set), then the rest exactly.
    from jaxprune._keys import _count

    axis = data.draw(st.sampled_from([None, *range(len(shape))]))
    density = data.draw(st.sampled_from([0.0, 0.3, 1.0]))
    x = np.random.default_rng(data.draw(st.integers(0, 99))).random(shape) < density
    others = tuple(d for d in range(len(shape)) if d != axis)
    got = jax.jit(_count, static_argnums=1)(x, axis)
    assert got.dtype == np.int32
    assert np.array_equal(np.asarray(got), np.sum(x, axis=others))


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from([(1,), (15,), (16,), (70_001,), (3, 17), (4, 2**16), (2, 2**16 + 1)]),
    st.data(),
)
def test_small_counts_sum_exactly(shape, data):
    # Counts of at most 255 summed without an int32 copy: sixteenths added as uint16, or rows
    # summed in float32 (exact up to 2**16 counts a row), then int32.
    from jaxprune._keys import _sum_small

    axes = data.draw(st.sampled_from([tuple(range(len(shape))), (len(shape) - 1,)]))
    top = data.draw(st.sampled_from([1, 128, 255]))
    x = np.random.default_rng(0).integers(0, top + 1, size=shape).astype(np.uint8)
    got = jax.jit(_sum_small, static_argnums=1)(x, axes)
    assert np.array_equal(np.asarray(got), np.sum(x, axis=axes, dtype=np.int64))


def test_small_counts_sum_exactly_past_float32s_integers():
    # A total of 31 bits (2**23 counts, one short of 255 each): float32 would round it.
    from jaxprune._keys import _sum_small

    x = np.full((128, 2**16), 255, np.uint8)
    x[77, 1234] = 254
    want = 255 * x.size - 1
    assert int(np.float32(want)) != want
    assert int(jax.jit(_sum_small, static_argnums=1)(x, (0, 1))) == want
    assert int(jax.jit(_sum_small, static_argnums=1)(x.reshape(-1), (0,))) == want


def test_a_jaxlib_without_the_memory_ordered_scheduler_still_ranks_split_leaves(monkeypatch):
    # Rankings with a split leaf compile with an XLA option; a jaxlib that does not know it
    # (it refuses every compile that names it) gets the default compile instead.
    from jax.sharding import Mesh, PartitionSpec

    from jaxprune import _ranking
    from jaxprune._blocks import Split

    split = (Split(Mesh(np.array(jax.devices()[:1]), ("x",)), PartitionSpec("x")),)
    assert _ranking.compiled(split) is _ranking._jitted_lean
    assert _ranking.compiled((None,)) is _ranking._jitted
    monkeypatch.setattr(_ranking, "_LEAN", {"xla_cpu_no_such_option": "x"})
    _ranking._lean_available.cache_clear()
    try:
        assert _ranking.compiled(split) is _ranking._jitted
    finally:
        _ranking._lean_available.cache_clear()


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("shape", [(3, 4), (256, 256)])  # the second: NaN counted in a first pass
@pytest.mark.parametrize("value", [np.nan, -np.inf])
@pytest.mark.parametrize("pruned_there", [False, True])
def test_non_finite_weights_are_refused(scope, shape, value, pruned_there):
    rng = np.random.default_rng(0)
    kernels = [rng.standard_normal((8, 8)).astype(np.float32)] * 2
    kernels[1] = rng.standard_normal(shape).astype(np.float32)
    kernels[1][1, 2] = value
    previous = [np.ones(k.shape, bool) for k in kernels]
    previous[1][1, 2] = not pruned_there  # a NaN where already pruned is refused all the same
    params = params_of(kernels)
    prev = {f"Dense_{i}": {"kernel": p, "bias": np.ones(2, bool)} for i, p in enumerate(previous)}
    with pytest.raises(ValueError, match=r"params\['Dense_1/kernel'\] contains NaN or inf"):
        jaxprune.masks_for_sparsity(params, 0.5, scope=scope, previous=prev)
    # A leaf a mapping leaves out is checked as well (compute_masks checks every prunable leaf).
    if scope == "layer":
        with pytest.raises(ValueError, match=r"params\['Dense_1/kernel'\] contains NaN"):
            jaxprune.masks_for_sparsity(params, {"Dense_0": 0.5})


def test_layer_rankings_run_concurrently_with_the_callers_settings():
    from jaxprune.masks import _concurrently

    def seen(i):
        return i, threading.current_thread().name, jax.config.jax_numpy_rank_promotion

    with jax.numpy_rank_promotion("warn"):  # thread-local: set again in each worker
        out = _concurrently(seen, [(i,) for i in range(6)], threads=3)
    assert [i for i, _, _ in out] == list(range(6))  # in order
    assert {rule for _, _, rule in out} == {"warn"}
    assert threading.current_thread().name not in {name for _, name, _ in out}
    # Several leaves in layer scope go through the threads and give the reference's masks.
    rng = np.random.default_rng(4)
    kernels = [rng.standard_normal(s).astype(np.float32) for s in [(300, 256), (7, 9), (64, 64)]]
    masks = kernel_masks(jaxprune.masks_for_sparsity(params_of(kernels), 0.7), len(kernels))
    alive = [np.ones(k.shape, bool) for k in kernels]
    for got, want in zip(masks, reference_masks(kernels, 0.7, "layer", alive), strict=True):
        np.testing.assert_array_equal(got, want)
