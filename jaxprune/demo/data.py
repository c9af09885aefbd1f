"""The demo's data: MNIST from local files, sklearn's 8x8 digits as the offline default, batching.

Nothing here downloads. Every loader returns a :class:`Dataset` of float32 images shaped
``(N, H, W, 1)`` scaled to ``[0, 1]`` and int32 labels; a missing or malformed input raises
:class:`DataError` with a one-line message that says what is wrong and how to fix it.
"""

import gzip
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "DataError",
    "Dataset",
    "batches",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "read_idx",
]

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# The four MNIST parts, and the file stems tried for each (LeCun's names, and the dotted variant
# some mirrors use); '.gz' is tried after the raw name.
_MNIST_STEMS = {
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


class DataError(ValueError):
    """A data set is missing or malformed; the message says what is wrong and how to fix it."""


class Dataset(NamedTuple):
    """A train/test split: images ``(N, H, W, 1)`` float32 in ``[0, 1]``, labels ``(N,)`` int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(
            f"{path}: not a complete gzip file ({e}); re-copy it or use the uncompressed file."
        ) from e
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e}).") from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (the format of LeCun's MNIST files), gzip-compressed or raw.

    The header is parsed, not assumed: two zero bytes, a type code (0x08 uint8, 0x09 int8,
    0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions, then each
    dimension as a big-endian uint32; the data follows, big-endian, and must be exactly as long
    as the dimensions say. Files ending in ``.gz`` are decompressed.

    Args:
      path: the file.

    Returns:
      The array, in native byte order, with the shape given by the header.

    Raises:
      DataError: if the file is missing, unreadable, has a bad magic number, or its data is
        shorter or longer than its header says.

    Example:
      >>> import tempfile, pathlib
      >>> f = pathlib.Path(tempfile.mkdtemp()) / "tiny-idx1-ubyte"
      >>> _ = f.write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 7, 8, 9]))
      >>> read_idx(f)
      array([7, 8, 9], dtype=uint8)
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file.")
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path}: not an IDX file (magic bytes {raw[:4].hex() or 'missing'}, expected "
            "00 00 <type code 08/09/0b/0c/0d/0e> <ndim>)."
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: truncated header: {ndim} dimensions need {header} bytes, found {len(raw)}."
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {what}: header says shape {shape} of {dtype.name}, i.e. {expected} data "
            f"bytes, found {found}."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _images(x: np.ndarray, source: str) -> np.ndarray:
    if x.ndim != 3:
        raise DataError(f"{source}: images have shape {x.shape}, expected (N, height, width).")
    if np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(
                f"{source}: integer pixels must be in 0-255 (found {x.min()}-{x.max()})."
            )
        return (x.astype(np.float32) / 255.0)[..., None]
    if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
        raise DataError(f"{source}: float pixels must be finite and in [0, 1]; scale them first.")
    return x.astype(np.float32)[..., None]


def _labels(y: np.ndarray, n: int, source: str) -> np.ndarray:
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{source}: labels have shape {y.shape}, expected ({n},) to match images.")
    if not np.issubdtype(y.dtype, np.integer) or (y.size and (y.min() < 0 or y.max() > 9)):
        raise DataError(f"{source}: labels must be integers 0-9, found dtype {y.dtype}.")
    return y.astype(np.int32)


def _assemble(parts: dict[str, np.ndarray], sources: dict[str, str], name: str) -> Dataset:
    x_train = _images(parts["x_train"], sources["x_train"])
    x_test = _images(parts["x_test"], sources["x_test"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{name}: train images are {x_train.shape[1:3]} but test images are "
            f"{x_test.shape[1:3]}; the files come from different data sets."
        )
    y_train = _labels(parts["y_train"], len(x_train), sources["y_train"])
    y_test = _labels(parts["y_test"], len(x_test), sources["y_test"])
    for split, x in (("x_train", x_train), ("x_test", x_test)):
        if len(x) == 0:
            raise DataError(f"{sources[split]}: holds no images; training and testing need some.")
    return Dataset(x_train, y_train, x_test, y_test, name)


def _load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = list(npz.files)
            parts = {k: npz[k] for k in _MNIST_STEMS if k in files}
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e}).") from e
    missing = [k for k in _MNIST_STEMS if k not in parts]
    if missing:
        raise DataError(
            f"{path}: missing arrays {missing}; a Keras-style mnist.npz holds x_train, y_train, "
            f"x_test, y_test (found {sorted(files)})."
        )
    return _assemble(parts, {k: f"{path}[{k}]" for k in parts}, "mnist")


def _find_idx(directory: Path, part: str) -> Path | None:
    for stem in _MNIST_STEMS[part]:
        for name in (stem, stem + ".gz"):
            if (directory / name).is_file():
                return directory / name
    return None


def load_mnist(path: str | os.PathLike) -> Dataset:
    """Loads MNIST from local files: the four IDX files (raw or ``.gz``) or a ``mnist.npz``.

    ``path`` is either a ``.npz`` file (Keras style: ``x_train``, ``y_train``, ``x_test``,
    ``y_test``) or a directory holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each raw or ``.gz``) or, failing
    those, a ``mnist.npz``.

    Args:
      path: the directory or ``.npz`` file.

    Returns:
      A :class:`Dataset` named ``'mnist'``: images ``(N, 28, 28, 1)`` float32 in ``[0, 1]``,
      labels int32.

    Raises:
      DataError: if the path does not exist, files are missing, or a file is malformed.

    Example:
      >>> import tempfile, pathlib, numpy as np
      >>> f = pathlib.Path(tempfile.mkdtemp()) / "mnist.npz"
      >>> img, lab = np.zeros((4, 28, 28), np.uint8), np.arange(4, dtype=np.uint8)
      >>> np.savez(f, x_train=img, y_train=lab, x_test=img[:2], y_test=lab[:2])
      >>> data = load_mnist(f)
      >>> data.x_train.shape, data.x_train.dtype, data.y_test.tolist()
      ((4, 28, 28, 1), dtype('float32'), [0, 1])
    """
    path = Path(path)
    if path.is_file():
        if path.suffix != ".npz":
            raise DataError(
                f"{path}: is a file but not a .npz; give the folder holding MNIST's four IDX "
                "files, or a Keras-style mnist.npz."
            )
        return _load_npz(path)
    if not path.is_dir():
        raise DataError(
            f"{path}: no such directory or file; give the folder holding MNIST's four IDX files "
            "(or mnist.npz), or omit the data argument to use the built-in 8x8 digits."
        )
    found = {part: _find_idx(path, part) for part in _MNIST_STEMS}
    if all(found.values()):
        parts = {part: read_idx(f) for part, f in found.items() if f is not None}
        return _assemble(parts, {part: str(f) for part, f in found.items()}, "mnist")
    if (path / "mnist.npz").is_file():
        return _load_npz(path / "mnist.npz")
    missing = [_MNIST_STEMS[part][0] for part, f in found.items() if f is None]
    raise DataError(
        f"{path}: missing MNIST files {missing} (raw or .gz) and no mnist.npz; copy them there "
        "(nothing is downloaded), or omit the data argument to use the built-in 8x8 digits."
    )


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """Loads scikit-learn's bundled 8x8 handwritten digits, split deterministically.

    This is the offline default: the 1,797 images ship inside scikit-learn, so it works on a
    fresh machine without any file. The split is a seeded random permutation (not stratified), so
    the same arguments always give the same sets.

    Args:
      test_fraction: fraction of the images held out for testing, in ``(0, 1)``.
      seed: seed of the permutation.

    Returns:
      A :class:`Dataset` named ``'digits'``: images ``(N, 8, 8, 1)`` float32 in ``[0, 1]``.

    Raises:
      ValueError: if ``test_fraction`` is not in ``(0, 1)``.
      DataError: if scikit-learn is not installed.

    Example:
      >>> data = load_digits()
      >>> data.x_train.shape, data.x_test.shape, float(data.x_train.max())
      ((1348, 8, 8, 1), (449, 8, 8, 1), 1.0)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction is {test_fraction}, expected a fraction in (0, 1).")
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise DataError(
            "the built-in digits need scikit-learn (pip install 'jaxprune[demo]'); "
            "or name a folder holding MNIST files."
        ) from e
    bunch = sk_load_digits()
    # sklearn's digits are integer intensities 0..16.
    x = (bunch.images.astype(np.float32) / 16.0)[..., None]
    y = bunch.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = min(max(round(test_fraction * len(x)), 1), len(x) - 1)
    test, train = order[:n_test], order[n_test:]
    return Dataset(x[train], y[train], x[test], y[test], "digits")


def load_dataset(path: str | os.PathLike | None = None) -> Dataset:
    """Loads the demo's data: MNIST from ``path``, or the built-in 8x8 digits when ``path`` is None.

    Args:
      path: a directory or ``.npz`` file for :func:`load_mnist`, or ``None``.

    Returns:
      A :class:`Dataset`.

    Raises:
      DataError: as :func:`load_mnist` and :func:`load_digits`.

    Example:
      >>> load_dataset().name
      'digits'
    """
    return load_digits() if path is None else load_mnist(path)


def batches(
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    seed: int | None = None,
    epoch: int = 0,
    drop_remainder: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields one epoch of ``(x, y)`` minibatches, shuffled reproducibly per epoch.

    The order is a permutation drawn from ``np.random.default_rng((seed, epoch))``, so each epoch
    gets a different order and the same ``(seed, epoch)`` always gives the same one; no state is
    kept between calls.

    Args:
      x: inputs, batched along axis 0.
      y: labels, with ``len(y) == len(x)``.
      batch_size: examples per batch, ``>= 1``.
      seed: shuffle seed; ``None`` keeps the original order.
      epoch: the epoch number, mixed into the seed.
      drop_remainder: drop the last batch when it is smaller than ``batch_size`` (keeps shapes
        fixed, so a jitted step compiles once).

    Yields:
      ``(x_batch, y_batch)`` pairs.

    Raises:
      ValueError: if ``batch_size < 1`` or ``x`` and ``y`` differ in length.

    Example:
      >>> import numpy as np
      >>> x, y = np.arange(5), np.arange(5) * 10
      >>> [b[1].tolist() for b in batches(x, y, batch_size=2)]
      [[0, 10], [20, 30], [40]]
      >>> len(list(batches(x, y, batch_size=2, seed=0, drop_remainder=True)))
      2
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size is {batch_size!r}, expected an int >= 1.")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)}; they must match.")
    n = len(x)
    order = np.arange(n) if seed is None else np.random.default_rng((seed, epoch)).permutation(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]
