"""Tests for jaxprune.storage: compact save/load of BCOO and dense trees."""

import io
import json
import os
import re
import stat
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.sparse import BCOO

from jaxprune import _atomic, _codecs, storage
from jaxprune.masks import masks_for_sparsity
from jaxprune.sparse import to_dense
from jaxprune.storage import FORMAT_VERSION, FileFormatError, load, save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_bcoo(rng, shape, density, dtype=np.float32):
    """A sorted BCOO of arbitrary bit patterns (NaN payloads, -0.0, inf, subnormals)."""
    size = int(np.prod(shape))
    flat = np.flatnonzero(rng.random(size) < density)
    bits = rng.integers(0, 256, flat.size * np.dtype(dtype).itemsize, dtype=np.uint8)
    data = np.frombuffer(bits.tobytes(), dtype)
    indices = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int32)
    return BCOO((jax.device_put(data), jax.device_put(indices)), shape=shape, indices_sorted=True)


def bits_of(x):
    x = np.asarray(x)
    return (
        x.view(f"u{x.dtype.itemsize}") if x.dtype.kind == "f" or x.dtype.name == "bfloat16" else x
    )


def assert_same_bcoo(got, want):
    assert isinstance(got, BCOO)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices))
    np.testing.assert_array_equal(bits_of(got.data), bits_of(want.data))


def to_bcoo(w):
    w = np.asarray(w)
    indices = np.argwhere(w != 0).astype(np.int32)
    return BCOO((jax.device_put(w[tuple(indices.T)]), jax.device_put(indices)), shape=w.shape)


def dense_of(matrix):
    out = np.zeros(matrix.shape, np.float64)
    out[tuple(np.asarray(matrix.indices).T)] = np.asarray(matrix.data)
    return out


def magnitude_pruned(rng, shape, kept):
    w = rng.normal(0.0, np.sqrt(2.0 / shape[0]), shape).astype(np.float32)
    threshold = np.quantile(np.abs(w), 1.0 - kept)
    return to_bcoo(np.where(np.abs(w) >= threshold, w, 0.0).astype(np.float32))


# ----------------------------------------------------------------------------- round trips


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple),
    density=st.sampled_from([0.0, 0.03, 0.1, 0.5, 1.0]),
    dtype=st.sampled_from([np.float32, np.float16, jnp.bfloat16, np.int32]),
    index=st.sampled_from(["auto", "bitmask", "delta"]),
    compress=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bcoo_round_trip_is_bit_exact(
    tmp_path_factory, shape, density, dtype, index, compress, seed
):
    rng = np.random.default_rng(seed)
    matrix = random_bcoo(rng, shape, density, dtype)
    path = tmp_path_factory.mktemp("rt") / "m.jxp"
    report = save(path, {"w": matrix}, index=index, compress=compress)
    assert_same_bcoo(load(path)["w"], matrix)
    assert report.max_abs_error == 0.0
    assert report.nbytes == os.path.getsize(path)
    assert report.leaves[0].nnz == matrix.nse


@settings(max_examples=15, deadline=None)
@given(
    dtype=st.sampled_from(["float32", "float16", "bfloat16", "int8", "uint16", "int32", "bool"]),
    shape=st.lists(st.integers(0, 6), max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
)
def test_dense_round_trip_is_bit_exact(tmp_path_factory, dtype, shape, seed):
    dtype = jnp.dtype(dtype)
    raw = np.random.default_rng(seed).integers(0, 256, int(np.prod(shape)) * dtype.itemsize)
    arr = np.frombuffer(raw.astype(np.uint8).tobytes(), dtype).reshape(shape)
    if dtype == np.bool_:
        arr = arr.view(np.uint8) % 2 == 1
    path = tmp_path_factory.mktemp("dense") / "d.jxp"
    save(path, {"x": jax.device_put(arr)})
    got = load(path)["x"]
    assert isinstance(got, jax.Array) and got.dtype == dtype and got.shape == shape
    np.testing.assert_array_equal(bits_of(got), bits_of(arr))


def test_large_stream_mixes_raw_and_compressed_byte_planes(tmp_path):
    # 70k float32: each byte plane is over the size where noise planes are stored untried.
    w = np.random.default_rng(8).normal(size=70_000).astype(np.float32)
    report = save(tmp_path / "big.jxp", {"w": jax.device_put(w)})
    np.testing.assert_array_equal(bits_of(load(tmp_path / "big.jxp")["w"]), bits_of(w))
    # Mantissa planes are noise; the sign/exponent plane of Gaussian weights compresses.
    assert w.nbytes * 0.8 < report.nbytes < w.nbytes * 0.95


def test_64_bit_leaves_keep_every_bit_without_x64(tmp_path):
    tree = {"f": np.array([0.1, -1e300]), "i": np.array([2**40 + 1], np.int64)}
    save(tmp_path / "x64.jxp", tree)
    got = load(tmp_path / "x64.jxp")
    for key in tree:  # jax would cut these to 32 bits, so they come back as numpy arrays
        assert got[key].dtype == tree[key].dtype
        np.testing.assert_array_equal(got[key], tree[key])


def test_a_root_leaf_round_trips(tmp_path):
    matrix = random_bcoo(np.random.default_rng(7), (6, 5), 0.4)
    report = save(tmp_path / "root.jxp", matrix)
    assert report.leaves[0].path == "<root>"
    assert_same_bcoo(load(tmp_path / "root.jxp"), matrix)


def test_gaps_beyond_one_token_round_trip(tmp_path):
    # Gaps of 70_000 need escapes in both uint8 and uint16 tokens.
    flat = np.array([0, 70_001, 70_002, 199_999])
    indices = np.stack([np.zeros_like(flat), flat], axis=1).astype(np.int32)
    data = jnp.arange(1.0, 5.0)
    matrix = BCOO((data, jax.device_put(indices)), shape=(1, 200_000))
    for index in ("delta", "bitmask", "auto"):
        report = save(tmp_path / "g.jxp", {"w": matrix}, index=index, compress=False)
        assert_same_bcoo(load(tmp_path / "g.jxp")["w"], matrix)
    # 4 entries over 200k positions: gap tokens are far smaller than a 25 kB bitmask.
    assert report.leaves[0].index_encoding in ("delta8", "delta16")


def test_gap_tokens_escape_long_gaps():
    tokens = _codecs._gap_tokens(np.array([3, 3 + 1 + 255 + 7]), np.uint8)
    np.testing.assert_array_equal(tokens, [3, 255, 7])
    flat = np.concatenate(list(_codecs._gap_positions(tokens, 2, 1000, "w")))
    np.testing.assert_array_equal(flat, [3, 266])


def test_explicit_zero_keeps_its_position_and_padding_is_dropped(tmp_path):
    w = jnp.array([[0.0, 2.0], [3.0, 0.0]])
    # As BCOO.fromdense(w, nse=4) pads: out-of-bounds indices (2, 2) with zero data.
    padded_indices = jnp.array([[0, 1], [1, 0], [2, 2], [2, 2]], jnp.int32)
    padded = BCOO((jnp.array([2.0, 3.0, 0.0, 0.0]), padded_indices), shape=(2, 2))
    explicit = BCOO(
        (jnp.array([0.0, 2.0]), jnp.array([[0, 0], [0, 1]], jnp.int32)), shape=(2, 2)
    )  # a surviving weight that is exactly 0.0
    save(tmp_path / "z.jxp", {"padded": padded, "explicit": explicit})
    got = load(tmp_path / "z.jxp")
    assert got["padded"].nse == 2
    np.testing.assert_array_equal(dense_of(got["padded"]), w)
    assert got["explicit"].nse == 2
    np.testing.assert_array_equal(np.asarray(got["explicit"].indices), [[0, 0], [0, 1]])


def test_unsorted_bcoo_comes_back_sorted_with_the_same_matrix(tmp_path):
    indices = jnp.array([[1, 2], [0, 1], [1, 0]], jnp.int32)
    matrix = BCOO((jnp.array([1.0, 2.0, 3.0]), indices), shape=(2, 3))
    save(tmp_path / "u.jxp", [matrix])
    got = load(tmp_path / "u.jxp")[0]
    assert (got.indices_sorted, got.unique_indices) == (False, False)  # as given
    np.testing.assert_array_equal(np.asarray(got.indices), [[0, 1], [1, 0], [1, 2]])
    np.testing.assert_array_equal(dense_of(got), [[0.0, 2.0, 0.0], [3.0, 0.0, 1.0]])


def test_structure_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tree = {
        "b": {"kernel": random_bcoo(rng, (4, 3), 0.5), "bias": jnp.ones(3)},
        "a": [jnp.zeros(2), (np.arange(3), None)],
        "layers": {7: {"conv": random_bcoo(rng, (3, 3, 2, 4), 0.2)}, 0: {"bias": jnp.ones(4)}},
        "empty": {},
    }
    save(tmp_path / "s.jxp", tree)
    got = load(tmp_path / "s.jxp")
    assert list(got) == ["b", "a", "layers", "empty"] and list(got["layers"]) == [7, 0]
    assert type(got["a"]) is list and type(got["a"][1]) is tuple and got["a"][1][1] is None
    assert got["empty"] == {}
    assert_same_bcoo(got["layers"][7]["conv"], tree["layers"][7]["conv"])
    assert jax.tree.structure(got) == jax.tree.structure(tree)


def test_linen_params_round_trip_gives_same_outputs(tmp_path):
    model = nn.Sequential([nn.Dense(5), nn.relu, nn.Dense(3)])
    x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
    params = model.init(jax.random.key(0), x)["params"]
    save(tmp_path / "linen.jxp", params)
    got = load(tmp_path / "linen.jxp")
    assert set(got) == {"layers_0", "layers_2"}
    np.testing.assert_array_equal(
        model.apply({"params": got}, x), model.apply({"params": params}, x)
    )


class _Mlp(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 2, rngs=rngs)])

    def __call__(self, x):
        return self.layers[1](jnp.maximum(self.layers[0](x), 0.0))


def test_nnx_state_loads_as_pure_dict_that_updates_a_model(tmp_path):
    model = _Mlp(nnx.Rngs(0))
    x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    save(tmp_path / "nnx.jxp", nnx.state(model, nnx.Param))
    got = load(tmp_path / "nnx.jxp")
    assert type(got) is dict and set(got["layers"]) == {0, 1}
    other = _Mlp(nnx.Rngs(1))
    assert not np.array_equal(other(x), model(x))
    nnx.update(other, got)
    np.testing.assert_array_equal(other(x), model(x))


def test_nnx_state_with_bcoo_leaves(tmp_path):
    model = _Mlp(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    sparse = jax.tree.map(
        lambda a: to_bcoo(jnp.where(jnp.abs(a) > 0.3, a, 0.0)) if a.ndim == 2 else a, state
    )
    report = save(tmp_path / "nnxs.jxp", sparse)
    assert [r.path for r in report.leaves if r.kind == "bcoo"] == [
        "layers/0/kernel",
        "layers/1/kernel",
    ]
    assert "layers/0/kernel" in str(report) and f"total {report.nbytes} bytes" in str(report)
    got = load(tmp_path / "nnxs.jxp")
    kernel = sparse["layers"][0]["kernel"].get_value()
    assert_same_bcoo(got["layers"][0]["kernel"], kernel)


def test_save_does_not_mutate_its_input(tmp_path):
    rng = np.random.default_rng(1)
    matrix = random_bcoo(rng, (5, 5), 0.4)
    tree = {"w": matrix, "b": np.arange(3.0)}
    before = (np.asarray(matrix.data).copy(), np.asarray(matrix.indices).copy())
    save(tmp_path / "m.jxp", tree, values="shared", bits=2)
    np.testing.assert_array_equal(bits_of(matrix.data), bits_of(before[0]))
    np.testing.assert_array_equal(np.asarray(matrix.indices), before[1])
    np.testing.assert_array_equal(tree["b"], np.arange(3.0))


# ----------------------------------------------------------------------------- size


def test_pruned_lenet_300_100_is_over_10x_smaller_than_dense_npz(tmp_path):
    rng = np.random.default_rng(0)
    layers = {"fc1": ((784, 300), 0.08), "fc2": ((300, 100), 0.09), "fc3": ((100, 10), 0.26)}
    sparse, dense = {}, {}
    for name, (shape, kept) in layers.items():
        kernel = magnitude_pruned(rng, shape, kept)
        bias = rng.normal(0.0, 0.01, shape[1]).astype(np.float32)
        sparse[name] = {"kernel": kernel, "bias": bias}
        dense[f"{name}_kernel"], dense[f"{name}_bias"] = dense_of(kernel).astype(np.float32), bias
    np.savez(tmp_path / "dense.npz", **dense)
    report = save(tmp_path / "lenet.jxp", sparse)
    ratio = os.path.getsize(tmp_path / "dense.npz") / report.nbytes
    assert ratio >= 10.0, str(report)


@pytest.mark.slow  # a benchmark's smoke run: CI runs it in its second step
def test_benchmark_quick_runs():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "file_size.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "BCOO int32 .npz" in out and "jaxprune auto (exact)" in out


# ----------------------------------------------------------------------------- lossy modes


def test_float16_reports_its_true_max_error_and_keeps_biases_exact(tmp_path):
    rng = np.random.default_rng(2)
    kernel = magnitude_pruned(rng, (40, 30), 0.2)
    bias = jax.device_put(rng.normal(size=30).astype(np.float32))
    report = save(tmp_path / "h.jxp", {"kernel": kernel, "bias": bias}, values="float16")
    got = load(tmp_path / "h.jxp")
    assert got["kernel"].dtype == jnp.float32
    error = np.max(np.abs(np.asarray(got["kernel"].data, np.float64) - np.asarray(kernel.data)))
    assert report.max_abs_error == error > 0.0
    # float16 keeps 11 significant bits: relative rounding error at most 2**-11.
    assert error <= np.max(np.abs(kernel.data)) * 2.0**-11
    np.testing.assert_array_equal(got["bias"], bias)
    assert [r.value_encoding for r in report.leaves] == ["float16", "exact"]


def test_float16_rejects_values_it_cannot_hold(tmp_path):
    big = {"Dense_0": {"kernel": jnp.full((2, 2), 1e6)}}
    with pytest.raises(ValueError, match=r"'Dense_0/kernel' has values beyond float16's range"):
        save(tmp_path / "big.jxp", big, values="float16")
    assert not os.path.exists(tmp_path / "big.jxp")


@settings(max_examples=10, deadline=None)
@given(bits=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_shared_weights_use_at_most_2_to_the_bits_values(tmp_path_factory, bits, seed):
    rng = np.random.default_rng(seed)
    kernel = magnitude_pruned(rng, (30, 20), 0.3)
    conv = jax.device_put(rng.normal(size=(3, 3, 2, 4)).astype(np.float32))  # dense weights too
    path = tmp_path_factory.mktemp("shared") / "s.jxp"
    tree = {"kernel": kernel, "Conv_0": {"kernel": conv}}
    report = save(path, tree, values="shared", bits=bits)
    got = load(path)
    np.testing.assert_array_equal(np.asarray(got["kernel"].indices), np.asarray(kernel.indices))
    errors = []
    for new, old in ((got["kernel"].data, kernel.data), (got["Conv_0"]["kernel"], conv)):
        new, old = np.asarray(new, np.float64), np.asarray(old, np.float64)
        assert len(np.unique(new)) <= 2**bits
        errors.append(np.max(np.abs(new - old)))
        # Shared values are means of groups of weights, so they lie within the weights' range.
        assert old.min() <= new.min() and new.max() <= old.max()
    assert report.max_abs_error == max(errors)
    assert [r.max_abs_error for r in report.leaves] == errors


def test_shared_weights_are_exact_when_few_distinct_values(tmp_path):
    values = jnp.array([[-0.5, 0.25, 0.0], [0.25, 0.75, -0.5]])
    report = save(tmp_path / "few.jxp", {"w": values}, values="shared", bits=2)
    assert report.max_abs_error == 0.0
    np.testing.assert_array_equal(load(tmp_path / "few.jxp")["w"], values)


def test_shared_weights_keep_pruned_zeros_of_dense_leaves(tmp_path):
    rng = np.random.default_rng(6)
    w = rng.normal(size=(20, 10)).astype(np.float32)
    w[np.abs(w) < 1.0] = 0.0
    report = save(tmp_path / "z.jxp", {"kernel": jax.device_put(w)}, values="shared", bits=1)
    got = np.asarray(load(tmp_path / "z.jxp")["kernel"])
    np.testing.assert_array_equal(got == 0, w == 0)
    assert len(np.unique(got)) == 2 and report.max_abs_error > 0.0


def test_shared_weights_reject_non_finite_values(tmp_path):
    w = {"Dense_0": {"kernel": jnp.array([[1.0, jnp.nan], [0.5, 2.0]])}}
    with pytest.raises(ValueError, match=r"leaf 'Dense_0/kernel' has NaN or infinite values"):
        save(tmp_path / "n.jxp", w, values="shared")


def test_lossy_modes_make_smaller_files(tmp_path):
    tree = {"w": magnitude_pruned(np.random.default_rng(3), (200, 100), 0.1)}
    sizes = {
        mode: save(tmp_path / f"{mode}.jxp", tree, values=mode, bits=5).nbytes
        for mode in ("exact", "float16", "shared")
    }
    assert sizes["shared"] < sizes["float16"] < sizes["exact"]


# ----------------------------------------------------------------------------- bad input to save


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"values": "int8"}, r"values='int8'; expected one of"),
        ({"index": "csr"}, r"index='csr'; expected one of"),
        ({"values": "shared", "bits": 9}, r"bits=9; expected an int from 1 to 8"),
        ({"bits": 0}, r"bits=0; expected an int from 1 to 8"),
        ({"bits": True}, r"bits=True; expected an int"),
    ],
)
def test_save_rejects_bad_options(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        save(tmp_path / "x.jxp", {"w": jnp.ones(2)}, **options)


@pytest.mark.parametrize(
    ("tree", "error", "message"),
    [
        ({"Dense_0": {"kernel": "abc"}}, TypeError, r"leaf 'Dense_0/kernel' is a str; expected"),
        ({"a": [1.0]}, TypeError, r"leaf 'a/0' is a float; expected a jax/numpy array"),
        ({("a", 1): jnp.ones(2)}, TypeError, r"key \('a', 1\) under '<root>' is a tuple"),
        ({"t": np.array(["x"])}, TypeError, r"leaf 't' has dtype <U1; expected a numeric dtype"),
        ({"rngs": {"key": jax.random.key(0)}}, TypeError, r"leaf 'rngs/key' is a PRNG key array"),
        (
            {"conv": BCOO((jnp.ones((2, 1)), jnp.zeros((2, 1, 1), jnp.int32)), shape=(2, 3))},
            ValueError,
            r"leaf 'conv' is a BCOO with n_batch=1, n_dense=0; expected n_batch=0",
        ),
        (
            {"w": BCOO((jnp.ones(2), jnp.array([[0, 1], [0, 1]])), shape=(2, 2))},
            ValueError,
            r"leaf 'w' is a BCOO with duplicate indices.*sum_duplicates",
        ),
    ],
)
def test_save_rejects_bad_trees_naming_the_leaf(tmp_path, tree, error, message):
    with pytest.raises(error, match=message):
        save(tmp_path / "x.jxp", tree)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- bad files


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(4)
    tree = {"fc": {"kernel": random_bcoo(rng, (30, 20), 0.2), "bias": jnp.arange(20.0)}}
    path = tmp_path / "model.jxp"
    save(path, tree)
    return path, path.read_bytes()


def test_truncated_files_are_rejected(saved):
    path, blob = saved
    for cut in (0, 5, 12, storage._HEADER.size + 10, len(blob) // 2, len(blob) - 1):
        path.write_bytes(blob[:cut])
        with pytest.raises(FileFormatError, match="truncated"):
            load(path)


def test_a_flipped_payload_byte_fails_the_checksum(saved):
    path, blob = saved
    corrupt = bytearray(blob)
    corrupt[len(blob) - 20] ^= 0x01
    path.write_bytes(bytes(corrupt))
    with pytest.raises(FileFormatError, match="corrupted: checksum mismatch"):
        load(path)


_OPTIONS = {"values": "exact", "bits": 8, "index": "auto", "compress": True}


@settings(max_examples=30, deadline=None)
@given(position=st.floats(0.0, 1.0, exclude_max=True), flip=st.integers(1, 255))
def test_any_flipped_byte_is_an_error_never_a_model(tmp_path_factory, position, flip):
    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("flip") / "m.jxp"
    blob = bytearray(storage._encode({"w": random_bcoo(rng, (8, 8), 0.3)}, _OPTIONS)[0])
    blob[int(position * len(blob))] ^= flip
    path.write_bytes(bytes(blob))
    with pytest.raises(FileFormatError):
        load(path)


def test_another_format_is_rejected(tmp_path):
    buffer = io.BytesIO()
    np.savez(buffer, w=np.ones(3))
    (tmp_path / "model.npz").write_bytes(buffer.getvalue())
    with pytest.raises(FileFormatError, match=r"is not a jaxprune model file: it starts with b'PK"):
        load(tmp_path / "model.npz")


def test_a_newer_format_version_is_rejected(saved):
    path, blob = saved
    path.write_bytes(blob[:8] + struct.pack("<H", FORMAT_VERSION + 1) + blob[10:])
    with pytest.raises(FileFormatError, match=rf"format version {FORMAT_VERSION + 1}, newer"):
        load(path)


def test_trailing_bytes_are_rejected(saved):
    path, blob = saved
    path.write_bytes(blob + b"\0")
    with pytest.raises(FileFormatError, match="trailing bytes"):
        load(path)


def test_a_bad_manifest_with_a_valid_checksum_is_still_rejected(saved):
    # A file written by something else with a correct CRC: the decoder checks counts itself.
    path, blob = saved
    _, version, manifest_len, payload_len = storage._HEADER.unpack_from(blob)
    start = storage._HEADER.size
    manifest = blob[start : start + manifest_len].replace(b'"nnz":', b'"nnz":1', 1)
    body = (
        storage._HEADER.pack(storage._MAGIC, version, len(manifest), payload_len)
        + manifest
        + blob[start + manifest_len : -4]
    )
    path.write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    with pytest.raises(FileFormatError, match="leaf 'fc/kernel'"):
        load(path)


# ----------------------------------------------------------------------------- atomic save


def test_interrupted_save_leaves_the_old_file_and_no_temp_file(saved, monkeypatch):
    path, blob = saved

    def write_half_then_fail(f, data):
        f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(_atomic, "_write_chunks", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save(path, {"other": jnp.ones((50, 50))})
    assert path.read_bytes() == blob
    assert os.listdir(path.parent) == [path.name]
    assert set(load(path)["fc"]) == {"kernel", "bias"}


def test_save_replaces_an_existing_file(saved):
    path, _ = saved
    save(path, {"new": jnp.arange(3)})
    np.testing.assert_array_equal(load(path)["new"], [0, 1, 2])
    assert os.listdir(path.parent) == [path.name]


# ----------------------------------------------------------------------------- crafted files


def rewrite(blob, edit=None, *, text=None, payload=None):
    """``blob`` with its manifest edited in place by ``edit`` (or replaced by ``text``), the
    payload optionally replaced, and lengths and CRC recomputed: a file only the decoder's own
    checks can refuse."""
    _, version, manifest_len, _ = storage._HEADER.unpack_from(blob)
    start = storage._HEADER.size
    manifest = json.loads(blob[start : start + manifest_len])
    if edit is not None:
        edit(manifest)
    data = (text or json.dumps(manifest, separators=(",", ":"))).encode()
    payload = blob[start + manifest_len : -4] if payload is None else payload
    body = storage._HEADER.pack(storage._MAGIC, version, len(data), len(payload)) + data + payload
    return body + struct.pack("<I", zlib.crc32(body))


def leaf_entry(manifest, path):
    return next(e for e in manifest["leaves"] if e["path"] == path)


def set_field(path, key, value):
    def edit(manifest):
        leaf_entry(manifest, path)[key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            set_field("fc/bias", "shape", [2**70]),
            r"'fc/bias': shape\[0\] is 1180591620717411303424",
        ),
        (set_field("fc/bias", "shape", [-4, -5]), r"'fc/bias': shape\[0\] is -4; expected an int"),
        (
            set_field("fc/bias", "shape", [2**40, 2**40]),
            r"shape .* is too large: its nonzero dims multiply past",
        ),
        (
            set_field("fc/bias", "shape", [0, 2**48, 2**48]),
            r"shape .* is too large: its nonzero dims multiply past",
        ),
        (set_field("fc/kernel", "index_dtype", "float32"), r"index_dtype float32 cannot hold"),
        (set_field("fc/kernel", "index_dtype", "int4"), r"index_dtype int4 cannot hold"),
        (set_field("fc/kernel", "index_dtype", "uint8"), None),  # (30, 20) fits in uint8
        (set_field("fc/bias", "dtype", "object"), r"dtype is 'object'; expected a numeric dtype"),
        (set_field("fc/kernel", "nnz", 10**6), r"'fc/kernel': nnz is 1000000; expected an int"),
        (set_field("fc/kernel", "indices_sorted", 1), r"indices_sorted is 1; expected true"),
        (set_field("fc/bias", "extra", 0), r"'fc/bias' has fields .*; expected exactly"),
        (set_field("fc/bias", "path", "fc/other"), r"'fc/bias': its entry says path 'fc/other'"),
    ],
)
def test_crafted_leaf_entries_are_refused(saved, edit, message):
    path, blob = saved
    path.write_bytes(rewrite(blob, edit))
    if message is None:
        assert load(path)["fc"]["kernel"].indices.dtype == np.uint8
        return
    with pytest.raises(FileFormatError, match=message):
        load(path)


def tree_of(manifest):
    return manifest["tree"]["v"][0]  # {"kernel": leaf 0, "bias": leaf 1} under "fc"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: tree_of(m).update(k=[["kernel"], "bias"]), r"key \['kernel'\] is a list"),
        (lambda m: tree_of(m).update(k=[0.5, "bias"]), r"key 0.5 is a float; expected str or int"),
        (lambda m: tree_of(m).update(k=[None, "bias"]), r"key None is a NoneType"),
        (lambda m: tree_of(m).update(k=[True, "bias"]), r"key True is a bool"),
        (lambda m: tree_of(m).update(k=["bias", "bias"]), r"a key appears twice"),
        (lambda m: tree_of(m)["v"][1].update(i=0), r"'fc/bias': leaf 0 is already at 'fc/kernel'"),
        (lambda m: tree_of(m)["v"][1].update(i=2), r"leaf index \(2 leaves\) is 2"),
        (lambda m: m["leaves"].append(m["leaves"][1]), r"leaves \[2\] of the manifest are not in"),
        (lambda m: m.update(version=2), r"manifest says format 'jaxprune' version 2"),
        (lambda m: tree_of(m).update(t="set"), r"t is 'set'; expected dict, list, tuple"),
    ],
)
def test_crafted_trees_are_refused(saved, edit, message):
    path, blob = saved
    path.write_bytes(rewrite(blob, edit))
    with pytest.raises(FileFormatError, match=message):
        load(path)


def test_repeated_json_fields_are_refused(saved):
    path, blob = saved
    text = rewrite(blob)[storage._HEADER.size : -4].split(b'"leaves"')[0].decode()  # tree only
    text = text.replace('"t":"leaf"', '"t":"none","t":"leaf"', 1)
    path.write_bytes(rewrite(blob, text=text + '"leaves":[]}', payload=b""))
    with pytest.raises(FileFormatError, match=r"repeats the field 't' in one object"):
        load(path)


def test_deeply_nested_json_is_refused_before_parsing(saved):
    path, blob = saved
    deep = '{"format":"jaxprune","version":1,"leaves":[],"tree":' + "[" * 100_000
    path.write_bytes(rewrite(blob, text=deep + "]" * 100_000 + "}"))
    with pytest.raises(FileFormatError, match=r"nests JSON deeper than \d+ levels"):
        load(path)


def test_a_tree_nested_past_the_limit_is_refused_by_save_and_load(tmp_path, saved):
    tree = leaf = jnp.ones(2)
    for _ in range(500):
        tree = [tree]
    with pytest.raises(ValueError, match=r"save: the tree is nested deeper than 100 containers"):
        save(tmp_path / "deep.jxp", tree)
    cycle = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match=r"nested deeper than 100 containers .* a cycle"):
        save(tmp_path / "cycle.jxp", cycle)
    path, blob = saved
    node = {"t": "leaf", "i": 0}
    for _ in range(101):
        node = {"t": "list", "v": [node]}
    text = json.dumps({"format": "jaxprune", "version": 1, "tree": node, "leaves": []})
    path.write_bytes(rewrite(blob, text=text, payload=b""))
    with pytest.raises(FileFormatError, match=r"nested deeper than 100 containers"):
        load(path)
    for _ in range(400):  # 100 containers deep is the limit, and it loads
        tree = tree[0]
    save(tmp_path / "ok.jxp", tree)
    got = load(tmp_path / "ok.jxp")
    for _ in range(100):
        got = got[0]
    np.testing.assert_array_equal(got, leaf)


def test_bool_bytes_other_than_0_and_1_are_refused(tmp_path):
    path = tmp_path / "b.jxp"
    save(path, {"mask": np.array([True, False, True])}, compress=False)
    blob = path.read_bytes()
    path.write_bytes(rewrite(blob, payload=b"\x01\x02\x01"))
    with pytest.raises(FileFormatError, match=r"'mask': a bool value is stored as a byte"):
        load(path)


def test_an_index_dtype_too_narrow_for_the_shape_is_refused(tmp_path):
    # uint8 indices would wrap rows 256..299 onto 0..43.
    matrix = to_bcoo(np.eye(300, 2, k=-298, dtype=np.float32) + np.eye(300, 2))
    path = tmp_path / "n.jxp"
    save(path, {"w": matrix})
    path.write_bytes(rewrite(path.read_bytes(), set_field("w", "index_dtype", "uint8")))
    with pytest.raises(
        FileFormatError, match=r"index_dtype uint8 cannot hold every position .* 299"
    ):
        load(path)


@pytest.mark.parametrize("index", [[-1, 0], [0, 5], [2, 0]])
def test_save_refuses_a_bcoo_index_outside_the_shape(tmp_path, index):
    matrix = BCOO((jnp.ones(2), jnp.array([[0, 1], index], jnp.int32)), shape=(2, 5))
    message = rf"entry 1 at index {re.escape(str(index))}, outside its shape \(2, 5\)"
    with pytest.raises(ValueError, match=message):
        save(tmp_path / "x.jxp", {"w": matrix})
    assert os.listdir(tmp_path) == []


def test_save_refuses_indices_too_narrow_for_the_shape(tmp_path):
    matrix = BCOO((jnp.ones(1), np.array([[3]], np.uint8)), shape=(300,))
    with pytest.raises(ValueError, match=r"uint8 indices, which cannot hold every position"):
        save(tmp_path / "x.jxp", {"w": matrix})


def zlib_raw(data):
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    return co.compress(data) + co.flush()


def test_a_stream_that_decompresses_past_its_size_stops_at_once(tmp_path):
    # A 100 KB part that inflates to 100 MB, declared as 1000 bytes: refused after 1001.
    path = tmp_path / "bomb.jxp"
    save(path, {"w": np.zeros(1000, np.uint8)})
    bomb = zlib_raw(bytes(100 << 20))

    def edit(manifest):
        leaf_entry(manifest, "w")["values"]["data"]["parts"] = [["zlib", 0, len(bomb)]]

    path.write_bytes(rewrite(path.read_bytes(), edit, payload=bomb))
    start = time.perf_counter()
    with pytest.raises(FileFormatError, match=r"'w': values, part 0: decompresses past the 1000"):
        load(path)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("codec", ["zlib", "lzma"])
def test_a_declared_size_beyond_what_the_codec_can_give_is_refused(tmp_path, codec):
    # A 1 GiB bitmask declared behind a few compressed bytes: refused before decompressing.
    path = tmp_path / "big.jxp"
    save(path, {"w": to_bcoo(np.eye(4, dtype=np.float32))}, index="bitmask")

    def edit(manifest):
        entry = leaf_entry(manifest, "w")
        entry["shape"] = [1 << 15, 1 << 18]
        entry["index"]["stream"] = {"planes": 1, "raw_length": 1 << 30, "parts": [[codec, 0, 40]]}

    path.write_bytes(rewrite(path.read_bytes(), edit))
    with pytest.raises(FileFormatError, match=rf"40 bytes of {codec} cannot hold the 1073741824"):
        load(path)


@pytest.mark.parametrize(
    ("part", "message"),
    [
        (["raw", 1, 80], r"a part starts at payload byte 1, expected 0"),
        (["raw", 0, 81], r"a raw part of 81 bytes for a 80-byte plane"),
        (["gzip", 0, 80], r"codec 'gzip'; expected one of"),
        (["raw", 0], r"part 0 is \['raw', 0\]; expected \[codec, offset, length\]"),
    ],
)
def test_parts_must_tile_the_payload(tmp_path, part, message):
    path = tmp_path / "t.jxp"
    save(path, {"w": np.arange(20, dtype=np.float32)}, compress=False)
    path.write_bytes(
        rewrite(path.read_bytes(), lambda m: m["leaves"][0]["values"]["data"].update(parts=[part]))
    )
    with pytest.raises(FileFormatError, match=message):
        load(path)


def run_with_timeout(fn, seconds):
    result = {}

    def target():
        try:
            fn()
        except BaseException as e:  # handed to the test
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "load blocked"
    return result.get("error")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_a_device_is_refused_without_reading_it():
    error = run_with_timeout(lambda: load("/dev/zero"), 5.0)
    assert isinstance(error, FileFormatError) and "'/dev/zero' is a device" in str(error)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    error = run_with_timeout(lambda: load(tmp_path / "pipe"), 5.0)
    assert isinstance(error, FileFormatError) and "is a FIFO, not a regular file" in str(error)


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(FileFormatError, match=r"is a directory, not a regular file"):
        load(tmp_path)


def test_load_peaks_at_most_1_5x_the_loaded_data(tmp_path):
    rng = np.random.default_rng(9)
    tree = {
        "fc1": {"kernel": magnitude_pruned(rng, (784, 300), 0.08), "bias": np.ones(300, "f4")},
        "dense": rng.normal(size=(1000, 1000)).astype(np.float32),
    }
    loaded_bytes = 4_000_000 + 4 * 300 + 12 * tree["fc1"]["kernel"].nse
    for options in ({}, {"compress": False}, {"index": "bitmask"}):
        save(tmp_path / "m.jxp", tree, **options)
        tracemalloc.start()
        got = load(tmp_path / "m.jxp")
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        # Measured 1.13x raw and 1.50x compressed: lzma's dictionary is a quarter of a float32 leaf.
        assert peak <= 1.6 * loaded_bytes, (options, peak / loaded_bytes)
        del got


# ----------------------------------------------------------------------------- how files are written


def test_files_get_the_umask_s_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        save(tmp_path / "m.jxp", {"w": jnp.ones(2)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "m.jxp").st_mode) == 0o640


def test_a_crashed_save_s_temp_file_is_removed_by_the_next_save(tmp_path):
    leftover = tmp_path / ".m.jxp.jaxprune-tmp"
    leftover.write_bytes(b"half a model" * 1000)
    os.chmod(leftover, 0o600)
    save(tmp_path / "m.jxp", {"w": jnp.ones(2)})
    assert os.listdir(tmp_path) == ["m.jxp"]
    assert stat.S_IMODE(os.stat(tmp_path / "m.jxp").st_mode) == 0o666 & ~current_umask()


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_saving_through_a_symlink_writes_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "m.jxp"
    save(target, {"w": jnp.zeros(2)})
    os.symlink(target, tmp_path / "link.jxp")
    save(tmp_path / "link.jxp", {"w": jnp.arange(3)})
    assert os.path.islink(tmp_path / "link.jxp")
    np.testing.assert_array_equal(load(target)["w"], [0, 1, 2])
    assert sorted(os.listdir(tmp_path / "real")) == ["m.jxp"]


def test_large_planes_take_fast_deflate_or_raw_and_load_bit_exact(tmp_path):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((1024, 1024)) * 0.05).astype(np.float32)
    params = {"fc": {"kernel": w}}
    masks = masks_for_sparsity(params, 0.5)
    kept = np.where(np.asarray(masks["fc"]["kernel"]), w, 0)
    exported = {"fc": {"kernel": to_bcoo(kept)}}
    values = np.asarray(exported["fc"]["kernel"].data)
    planes = np.frombuffer(values.tobytes(), np.uint8).reshape(-1, 4).T
    assert planes.shape[1] >= _codecs._FAST_FROM  # every value plane takes the large-plane path
    codecs = [_codecs._smallest(bytes(plane), compress=True)[0] for plane in planes]
    assert codecs[:2] == ["raw", "raw"] and codecs[3] == "zlib"  # noise raw, sign/exponent deflated
    report = save(tmp_path / "m.jaxprune", exported)
    assert report.nbytes < 0.9 * (values.nbytes + w.size // 8)
    got = to_dense(load(tmp_path / "m.jaxprune"))["fc"]["kernel"]
    np.testing.assert_array_equal(
        np.asarray(got), np.where(np.asarray(masks["fc"]["kernel"]), w, 0)
    )
