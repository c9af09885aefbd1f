"""Tests of the demo's data loaders: the IDX parser, MNIST folders and .npz, digits, batching."""

import gzip
import hashlib
import struct
from pathlib import Path

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune.demo.data import (
    DataError,
    Dataset,
    batches,
    load_dataset,
    load_digits,
    load_mnist,
    read_idx,
)

REAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
TYPE_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encodes an array as IDX, written independently of the parser under test."""
    kind = array.dtype.str[1:]
    header = struct.pack(">BBBB", 0, 0, TYPE_CODES[kind], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_mnist(folder: Path, n_train=6, n_test=4, *, gz=(True, False, True, False)) -> dict:
    rng = np.random.default_rng(0)
    parts = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for (name, array), zipped in zip(parts.items(), gz, strict=True):
        write(folder / (name + (".gz" if zipped else "")), idx_bytes(array))
    return parts


# --- the IDX parser -------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from(["u1", "i1", ">i2", "<i4", "f4", "f8"]).map(np.dtype),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
        elements={"allow_nan": False},
    ),
    gz=st.booleans(),
)
def test_read_idx_round_trips_every_type(tmp_path_factory, array, gz):
    path = tmp_path_factory.mktemp("idx") / ("a.idx.gz" if gz else "a.idx")
    got = read_idx(write(path, idx_bytes(array)))
    assert got.shape == array.shape
    assert got.dtype.kind == array.dtype.kind and got.dtype.itemsize == array.dtype.itemsize
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_truncated_idx_names_file_and_expected_size(tmp_path, suffix):
    data = idx_bytes(np.zeros((3, 4, 5), np.uint8))
    path = write(tmp_path / f"train-images-idx3-ubyte{suffix}", data[:-7])
    with pytest.raises(
        DataError,
        match=r"train-images-idx3-ubyte.*truncated: header says shape \(3, 4, 5\) of uint8, "
        r"i\.e\. 60 data bytes, found 53",
    ):
        read_idx(path)


def test_cut_gzip_stream_is_a_clear_error(tmp_path):
    packed = gzip.compress(idx_bytes(np.arange(5000, dtype=np.int32)))
    path = tmp_path / "labels.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match=r"labels\.gz: not a complete gzip file"):
        read_idx(path)


def test_truncated_header_and_trailing_bytes(tmp_path):
    header_only = write(tmp_path / "h", bytes([0, 0, 8, 3, 0, 0, 0, 2]))
    with pytest.raises(DataError, match=r"truncated header: 3 dimensions need 16 bytes, found 8"):
        read_idx(header_only)
    long = write(tmp_path / "l", idx_bytes(np.zeros(4, np.uint8)) + b"\x00")
    with pytest.raises(DataError, match=r"has trailing bytes: .* 4 data bytes, found 5"):
        read_idx(long)


@pytest.mark.parametrize(
    "magic", [b"\x00\x00\x07\x01", b"\x01\x00\x08\x01", b"PK\x03\x04", b"\x00\x00"]
)
def test_wrong_magic_is_not_idx(tmp_path, magic):
    path = write(tmp_path / "bad-idx1-ubyte", magic + b"\x00\x00\x00\x01\x05")
    with pytest.raises(DataError, match=r"bad-idx1-ubyte: not an IDX file \(magic bytes"):
        read_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope-idx1-ubyte: no such file"):
        read_idx(tmp_path / "nope-idx1-ubyte")


# --- MNIST folders and .npz -----------------------------------------------------------------


def test_load_mnist_from_mixed_raw_and_gz_files(tmp_path):
    parts = write_mnist(tmp_path)
    data = load_mnist(tmp_path)
    assert isinstance(data, Dataset) and data.name == "mnist"
    assert data.x_train.shape == (6, 28, 28, 1) and data.x_test.shape == (4, 28, 28, 1)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    np.testing.assert_allclose(
        data.x_train[..., 0], parts["train-images-idx3-ubyte"] / 255.0, rtol=1e-6
    )
    np.testing.assert_array_equal(data.y_test, parts["t10k-labels-idx1-ubyte"])


def test_load_mnist_names_the_missing_files(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing MNIST files \['t10k-labels-idx1-ubyte'\]"):
        load_mnist(tmp_path)
    with pytest.raises(DataError, match=r"no such directory or file.*omit the data argument"):
        load_mnist(tmp_path / "absent")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: is a file but not a \.npz"):
        load_mnist(tmp_path / "train-images-idx3-ubyte.gz")


def test_load_mnist_checks_labels_against_images(tmp_path):
    write_mnist(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(DataError, match=r"labels have shape \(5,\), expected \(6,\)"):
        load_mnist(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.full(6, 12, np.uint8)))
    with pytest.raises(DataError, match=r"labels must be integers 0-9"):
        load_mnist(tmp_path)


def test_load_mnist_npz_file_or_folder(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {
        "x_train": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 5).astype(np.uint8),
        "x_test": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 3).astype(np.uint8),
    }
    np.savez(tmp_path / "mnist.npz", **arrays)
    for source in (tmp_path / "mnist.npz", tmp_path):
        data = load_mnist(source)
        np.testing.assert_allclose(data.x_test[..., 0], arrays["x_test"] / 255.0, rtol=1e-6)
        np.testing.assert_array_equal(data.y_train, arrays["y_train"])
    np.savez(tmp_path / "partial.npz", x_train=arrays["x_train"])
    with pytest.raises(DataError, match=r"partial\.npz: missing arrays \['y_train', 'x_test'"):
        load_mnist(tmp_path / "partial.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk\.npz: not a readable \.npz file"):
        load_mnist(tmp_path / "junk.npz")


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason=f"real MNIST not present at {REAL_MNIST}")
def test_real_mnist():
    data = load_mnist(REAL_MNIST)
    assert data.x_train.shape == (60000, 28, 28, 1) and data.x_test.shape == (10000, 28, 28, 1)
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0
    assert np.bincount(data.y_test, minlength=10).min() > 800  # every digit present
    # The labels, re-encoded as IDX, must hash to the official MD5 of the raw label file.
    raw = idx_bytes(data.y_test.astype(np.uint8))
    assert hashlib.md5(raw).hexdigest() == "27ae3e4e09519cfbb04c329615203637"


# --- the built-in digits --------------------------------------------------------------------


def test_digits_split_is_deterministic_and_complete():
    from sklearn.datasets import load_digits as sk_digits

    a, b = load_digits(), load_digits()
    for left, right in zip(a[:4], b[:4], strict=True):
        np.testing.assert_array_equal(left, right)
    assert a.name == "digits" and a.x_train.shape[1:] == (8, 8, 1)
    assert a.x_train.dtype == np.float32 and a.x_train.min() >= 0.0 and a.x_train.max() == 1.0
    ref = sk_digits()
    assert len(a.x_train) + len(a.x_test) == len(ref.target)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([a.y_train, a.y_test])), np.sort(ref.target)
    )
    other = load_digits(seed=1, test_fraction=0.5)
    assert len(other.x_test) == round(0.5 * len(ref.target))
    assert not np.array_equal(other.y_test[:50], a.y_test[:50])
    with pytest.raises(ValueError, match=r"test_fraction is 1\.0, expected a fraction in \(0, 1\)"):
        load_digits(test_fraction=1.0)


def test_load_dataset_dispatches(tmp_path):
    assert load_dataset(None).name == "digits"
    write_mnist(tmp_path)
    assert load_dataset(tmp_path).name == "mnist"


# --- batching -------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 40),
    batch_size=st.integers(1, 12),
    seed=st.none() | st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 5),
    drop=st.booleans(),
)
def test_batches_cover_a_permutation(n, batch_size, seed, epoch, drop):
    x, y = np.arange(n) * 2, np.arange(n)
    got = list(batches(x, y, batch_size=batch_size, seed=seed, epoch=epoch, drop_remainder=drop))
    sizes = [len(b[1]) for b in got]
    if drop:
        assert sizes == [batch_size] * (n // batch_size)
    else:
        assert sum(sizes) == n and all(s == batch_size for s in sizes[:-1])
    seen = np.concatenate([b[1] for b in got]) if got else np.array([], int)
    assert len(set(seen.tolist())) == len(seen)  # no example twice
    for xb, yb in got:
        np.testing.assert_array_equal(xb, yb * 2)  # x and y stay paired
    if seed is None:
        np.testing.assert_array_equal(seen, np.arange(len(seen)))
    again = list(batches(x, y, batch_size=batch_size, seed=seed, epoch=epoch, drop_remainder=drop))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(got, again, strict=True))


def test_batches_reshuffle_each_epoch():
    x = np.arange(100)
    first = np.concatenate([b for b, _ in batches(x, x, batch_size=10, seed=3, epoch=0)])
    second = np.concatenate([b for b, _ in batches(x, x, batch_size=10, seed=3, epoch=1)])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(100))
    assert not np.array_equal(first, second) and not np.array_equal(first, x)


def test_batches_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"batch_size is 0, expected an int >= 1"):
        next(batches(np.ones(3), np.ones(3), batch_size=0))
    with pytest.raises(ValueError, match=r"x has 3 examples but y has 2"):
        next(batches(np.ones(3), np.ones(2), batch_size=1))
