"""Compact model files: save and load pruned (BCOO) or dense parameter trees.

A file holds a fixed header, a JSON manifest, a payload of byte streams, and a CRC-32 of everything
before it::

    b"JAXPRUNE" | version u16 | manifest length u32 | payload length u64
    | manifest (JSON) | payload | crc32 of all before

All integers are little-endian. The manifest records the tree structure, and for every leaf its
dtype, shape and streams; a stream is split into byte planes (byte i of every item), each stored
raw, zlib or lzma, whichever is smallest, at a recorded offset. Each BCOO leaf stores the positions
it keeps (a bitmask over the dense shape or the gaps between kept positions, whichever is smaller
for that layer) and its values, bit-exact unless a lossy mode is asked for. No pickle: loading an
untrusted file can at worst raise an error.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental.sparse import BCOO

from jaxprune._codecs import (
    FileFormatError,
    _decode_index,
    _decode_values,
    _encode_index,
    _encode_values,
    _max_abs_error,
    _Payload,
)
from jaxprune._tree import WEIGHT_NAMES, last_key

__all__ = ["FORMAT_VERSION", "FileFormatError", "LeafReport", "SaveReport", "load", "save"]

FORMAT_VERSION = 1
"""The newest file format version this module writes and reads."""

_MAGIC = b"JAXPRUNE"
_HEADER = struct.Struct("<8sHIQ")  # magic, version, manifest length, payload length
_CRC = struct.Struct("<I")
_VALUE_MODES = ("exact", "float16", "shared")
_INDEX_MODES = ("auto", "bitmask", "delta")
_CHUNK = 1 << 20


class LeafReport(NamedTuple):
    """How one leaf was stored by :func:`save`.

    Attributes:
      path: the leaf's path, e.g. ``'Dense_0/kernel'``.
      kind: ``'bcoo'`` or ``'dense'``.
      shape: the (dense) shape.
      nnz: stored entries (all entries for a dense leaf).
      index_encoding: ``'bitmask'``, ``'delta8'`` or ``'delta16'`` for a BCOO leaf, else ``''``.
      value_encoding: ``'exact'``, ``'float16'`` or ``'shared<bits>'``.
      nbytes: payload bytes of this leaf.
      max_abs_error: largest absolute change of a value (0.0 when stored exactly).
    """

    path: str
    kind: str
    shape: tuple[int, ...]
    nnz: int
    index_encoding: str
    value_encoding: str
    nbytes: int
    max_abs_error: float


class SaveReport(NamedTuple):
    """What :func:`save` wrote.

    Attributes:
      path: the file written.
      nbytes: its size in bytes.
      max_abs_error: largest absolute change of any value (0.0 in the default exact mode).
      leaves: one :class:`LeafReport` per leaf, in tree order.
    """

    path: str
    nbytes: int
    max_abs_error: float
    leaves: tuple[LeafReport, ...]

    def __str__(self) -> str:
        lines = [f"{'path':<28} {'kind':<5} {'nnz':>9} {'index':<8} {'values':<8} {'bytes':>9}"]
        for r in self.leaves:
            lines.append(
                f"{r.path:<28} {r.kind:<5} {r.nnz:>9} {r.index_encoding:<8} "
                f"{r.value_encoding:<8} {r.nbytes:>9}"
            )
        lines.append(f"total {self.nbytes} bytes, max abs error {self.max_abs_error:.3g}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- dtypes


def _dtype_name(dtype: np.dtype, where: str) -> str:
    if dtype.kind in "biufc" or hasattr(ml_dtypes, dtype.name):
        return dtype.name
    raise TypeError(
        f"save: leaf '{where}' has dtype {dtype}; expected a numeric dtype "
        "(bool, int, float, complex)"
    )


def _dtype_from_name(name: Any, where: str) -> np.dtype:
    try:
        dtype = np.dtype(getattr(ml_dtypes, name)) if hasattr(ml_dtypes, name) else np.dtype(name)
    except TypeError as e:
        raise FileFormatError(f"unknown dtype {name!r} for leaf '{where}'") from e
    if dtype.kind not in "biufc" and not hasattr(ml_dtypes, name):
        raise FileFormatError(f"unsupported dtype {name!r} for leaf '{where}'")
    return dtype.newbyteorder("<") if dtype.kind in "biufc" else dtype


def _little_endian(arr: np.ndarray) -> np.ndarray:
    return arr.astype(arr.dtype.newbyteorder("<")) if arr.dtype.kind in "biufc" else arr


# ----------------------------------------------------------------------------- leaves


def _lossy(mode: str, dtype: np.dtype, path: str, sparse: bool) -> str:
    # Lossy modes touch weights only (exported BCOO kernels and leaves with a Flax weight name);
    # biases, norm scales and other small leaves stay exact, as in Deep Compression (Han et al.
    # 2016).
    weight = sparse or last_key(path) in WEIGHT_NAMES
    return mode if jnp.issubdtype(dtype, jnp.floating) and weight else "exact"


def _encode_bcoo(leaf: BCOO, where: str, opts: dict, payload: _Payload):
    if leaf.n_batch or leaf.n_dense:
        raise ValueError(
            f"save: leaf '{where}' is a BCOO with n_batch={leaf.n_batch}, n_dense={leaf.n_dense}; "
            "expected n_batch=0 and n_dense=0 (convert it with "
            "jax.experimental.sparse.bcoo_update_layout(x, n_batch=0, n_dense=0))"
        )
    shape = tuple(int(d) for d in leaf.shape)
    size = int(np.prod(shape, dtype=np.int64))
    indices = np.asarray(leaf.indices).reshape(-1, len(shape))
    data = np.asarray(leaf.data)
    # BCOO pads with out-of-bounds indices; those entries stand for nothing and are dropped.
    inside = np.all((indices >= 0) & (indices < np.asarray(shape, dtype=np.int64)), axis=1)
    flat = np.ravel_multi_index(tuple(indices[inside].T), shape) if shape else np.zeros(0, int)
    order = np.argsort(flat, kind="stable")
    flat, values = flat[order].astype(np.int64), _little_endian(data[inside][order])
    if flat.size and np.any(np.diff(flat) == 0):
        raise ValueError(
            f"save: leaf '{where}' is a BCOO with duplicate indices; expected unique indices "
            "(call .sum_duplicates() on it first)"
        )
    index = _encode_index(flat, size, opts["index"], payload)
    mode = _lossy(opts["values"], values.dtype, where, sparse=True)
    value_entry, restored, value_name = _encode_values(values, mode, opts["bits"], where, payload)
    entry = {
        "kind": "bcoo",
        "shape": list(shape),
        "dtype": _dtype_name(data.dtype, where),
        "index_dtype": _dtype_name(np.asarray(leaf.indices).dtype, where),
        "nnz": int(flat.size),
        # Kept so the loaded BCOO has the same pytree structure (its aux data holds these flags).
        "indices_sorted": bool(leaf.indices_sorted),
        "unique_indices": bool(leaf.unique_indices),
        "index": index,
        "values": value_entry,
    }
    error = _max_abs_error(values, restored)
    return entry, index["encoding"], value_name, int(flat.size), error


def _encode_dense(leaf: Any, where: str, opts: dict, payload: _Payload):
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        raise TypeError(
            f"save: leaf '{where}' is a PRNG key array; expected parameters only (for NNX, "
            "save nnx.state(model, nnx.Param); or store jax.random.key_data(key))"
        )
    arr = np.asarray(leaf)
    dtype = _dtype_name(arr.dtype, where)
    values = _little_endian(arr).ravel()
    mode = _lossy(opts["values"], arr.dtype, where, sparse=False)
    value_entry, restored, value_name = _encode_values(values, mode, opts["bits"], where, payload)
    entry = {"kind": "dense", "shape": list(arr.shape), "dtype": dtype, "values": value_entry}
    return entry, "", value_name, int(arr.size), _max_abs_error(values, restored)


def _decode_leaf(payload: bytes, entry: Any, index: int):
    if not isinstance(entry, dict):
        raise FileFormatError(f"leaf {index} of the manifest is not an object")
    where = str(entry.get("path", index))
    try:
        kind, shape = entry["kind"], tuple(int(d) for d in entry["shape"])
        dtype = _dtype_from_name(entry["dtype"], where)
        size = int(np.prod(shape, dtype=np.int64))
        if kind == "dense":
            values = _decode_values(payload, entry["values"], dtype, size, where).reshape(shape)
        elif kind == "bcoo":
            nnz = int(entry["nnz"])
            flat = _decode_index(payload, entry["index"], nnz, size, where)
            values = _decode_values(payload, entry["values"], dtype, nnz, where)
            # Indices are only positions: any int dtype jax holds represents them.
            index_dtype = jax.dtypes.canonicalize_dtype(
                _dtype_from_name(entry["index_dtype"], where)
            )
            indices = np.stack(np.unravel_index(flat, shape), axis=1).astype(index_dtype)
            flags = {k: entry[k] for k in ("indices_sorted", "unique_indices")}
            if not all(isinstance(v, bool) for v in flags.values()):
                raise FileFormatError(f"bad BCOO flags for leaf '{where}': {flags}")
        else:
            raise FileFormatError(f"unknown leaf kind {kind!r} for leaf '{where}'")
    except FileFormatError:
        raise
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"bad manifest entry for leaf '{where}': {e!r}") from e
    exact = jax.dtypes.canonicalize_dtype(dtype) == dtype
    if kind == "dense":
        # Without jax_enable_x64, jax would cut a 64-bit leaf to 32 bits; numpy keeps it.
        return jax.device_put(values) if exact else values
    if not exact:
        raise ValueError(
            f"load: leaf '{where}' is a BCOO of {dtype} values, which jax holds only with "
            "jax_enable_x64; enable it with jax.config.update('jax_enable_x64', True) to load it"
        )
    return BCOO(
        (jax.device_put(values), jax.device_put(indices.reshape(nnz, len(shape)))),
        shape=shape,
        **flags,
    )


# ----------------------------------------------------------------------------- tree structure


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _encode_node(node: Any, path: str, visit) -> dict[str, Any]:
    """Manifest form of the tree: dicts (str/int keys), lists, tuples, None and leaves."""
    if isinstance(node, nnx.Variable):
        # An NNX Param & co. is stored as its value; load gives the pure nested dict.
        return _encode_node(node.get_value(), path, visit)
    if node is None:
        return {"t": "none"}
    if isinstance(node, (BCOO, jax.Array, np.ndarray, np.generic)):
        return {"t": "leaf", "i": visit(node, path or "<root>")}
    if isinstance(node, Mapping):
        keys = list(node.keys())
        for key in keys:
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise TypeError(
                    f"save: key {key!r} under '{path or '<root>'}' is a {type(key).__name__}; "
                    "expected str or int dict keys"
                )
        values = [_encode_node(node[k], _join(path, k), visit) for k in keys]
        return {"t": "dict", "k": keys, "v": values}
    if type(node) in (list, tuple):
        values = [_encode_node(v, _join(path, i), visit) for i, v in enumerate(node)]
        return {"t": type(node).__name__, "v": values}
    raise TypeError(
        f"save: leaf '{path or '<root>'}' is a {type(node).__name__}; expected a jax/numpy array, "
        "a BCOO, None, or a dict/list/tuple of them"
    )


def _decode_node(node: Any, leaves: list, depth: int = 0) -> Any:
    if depth > 1000 or not isinstance(node, dict):
        raise FileFormatError("the manifest's tree structure is malformed")
    kind = node.get("t")
    if kind == "none":
        return None
    if kind == "leaf":
        i = node.get("i")
        if not isinstance(i, int) or not 0 <= i < len(leaves):
            raise FileFormatError(f"the manifest refers to a missing leaf {i!r}")
        return leaves[i]
    children = node.get("v")
    if not isinstance(children, list):
        raise FileFormatError("the manifest's tree structure is malformed")
    values = [_decode_node(c, leaves, depth + 1) for c in children]
    if kind == "dict":
        keys = node.get("k")
        if not isinstance(keys, list) or len(keys) != len(values):
            raise FileFormatError("the manifest's tree structure is malformed")
        return dict(zip(keys, values, strict=True))
    if kind == "list":
        return values
    if kind == "tuple":
        return tuple(values)
    raise FileFormatError(f"unknown node kind {kind!r} in the manifest")


# ----------------------------------------------------------------------------- file container


def _encode(tree: Any, opts: dict) -> tuple[bytes, list[LeafReport]]:
    payload = _Payload(compress=opts["compress"])
    entries: list[dict] = []
    reports: list[LeafReport] = []

    def visit(leaf: Any, where: str) -> int:
        start = payload.size
        encode = _encode_bcoo if isinstance(leaf, BCOO) else _encode_dense
        entry, index_name, value_name, nnz, error = encode(leaf, where, opts, payload)
        entry["path"] = where
        entries.append(entry)
        kind = entry["kind"]
        shape = tuple(entry["shape"])
        nbytes = payload.size - start
        reports.append(LeafReport(where, kind, shape, nnz, index_name, value_name, nbytes, error))
        return len(entries) - 1

    structure = _encode_node(tree, "", visit)
    manifest = json.dumps(
        {"format": "jaxprune", "version": FORMAT_VERSION, "tree": structure, "leaves": entries},
        separators=(",", ":"),
    ).encode()
    body = b"".join(
        [
            _HEADER.pack(_MAGIC, FORMAT_VERSION, len(manifest), payload.size),
            manifest,
            *payload.parts,
        ]
    )
    return body + _CRC.pack(zlib.crc32(body)), reports


def _decode(blob: bytes, name: str) -> Any:
    if blob[: len(_MAGIC)] != _MAGIC[: len(blob)]:
        raise FileFormatError(
            f"{name} is not a jaxprune model file: it starts with {blob[:8]!r}, expected {_MAGIC!r}"
        )
    if len(blob) < _HEADER.size:
        raise FileFormatError(f"{name} is truncated: {len(blob)} bytes, shorter than the header")
    _, version, manifest_len, payload_len = _HEADER.unpack_from(blob)
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{name} has format version {version}, newer than this jaxprune reads "
            f"(up to {FORMAT_VERSION}); upgrade jaxprune to load it"
        )
    if version < 1:
        raise FileFormatError(f"{name} has an invalid format version {version}")
    expected = _HEADER.size + manifest_len + payload_len + _CRC.size
    if len(blob) != expected:
        what = "truncated" if len(blob) < expected else "corrupted (trailing bytes)"
        raise FileFormatError(f"{name} is {what}: {len(blob)} bytes, expected {expected}")
    (crc,) = _CRC.unpack_from(blob, expected - _CRC.size)
    if zlib.crc32(blob[: expected - _CRC.size]) != crc:
        raise FileFormatError(f"{name} is corrupted: checksum mismatch")
    start = _HEADER.size + manifest_len
    try:
        manifest = json.loads(blob[_HEADER.size : start])
        leaf_entries = manifest["leaves"]
        structure = manifest["tree"]
    except (ValueError, KeyError, TypeError) as e:
        raise FileFormatError(f"{name} has an unreadable manifest: {e}") from e
    payload = blob[start : start + payload_len]
    if not isinstance(leaf_entries, list):
        raise FileFormatError(f"{name} has an unreadable manifest: 'leaves' is not a list")
    leaves = [_decode_leaf(payload, e, i) for i, e in enumerate(leaf_entries)]
    return _decode_node(structure, leaves)


def _write_chunks(f, blob: bytes) -> None:
    for i in range(0, len(blob), _CHUNK):
        f.write(blob[i : i + _CHUNK])


def _write_atomically(path: str, blob: bytes) -> None:
    """Temp file in the same directory, fsync, then rename: readers see the old file or the new."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            _write_chunks(f, blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save(
    path: str | os.PathLike,
    tree: Any,
    *,
    values: str = "exact",
    bits: int = 8,
    index: str = "auto",
    compress: bool = True,
) -> SaveReport:
    """Writes a tree of arrays and BCOO matrices to a compact file, atomically.

    Dense leaves are stored whole. A BCOO leaf (``n_batch=0, n_dense=0``, any ndim) stores only its
    entries: their positions as a bitmask or as gaps, whichever is smaller for that leaf, and their
    values. Explicitly stored zeros keep their positions; out-of-bounds padding entries are
    dropped. Dicts (str or int keys), lists, tuples and ``None`` keep their structure; an NNX
    ``State`` is stored as its pure nested dict (see :func:`load`).

    Args:
      path: the file to write; an existing file is replaced only once the new one is complete.
      tree: a pytree of ``jax.Array``/``np.ndarray`` and ``BCOO`` leaves, e.g. the output of
        ``jaxprune.sparse.to_bcoo`` or a Linen params dict or ``nnx.state(model, nnx.Param)``.
      values: ``'exact'`` (default) keeps every value bit-exact. ``'float16'`` rounds the weights to
        half precision; ``'shared'`` replaces them by ``2**bits`` shared values per leaf found by
        1-D k-means (Han et al. 2016, Deep Compression). Lossy modes touch weights only (BCOO
        leaves and floating leaves named ``kernel`` or ``embedding``); biases stay exact.
      bits: code width for ``values='shared'``, 1 to 8.
      index: ``'auto'`` picks per leaf the smallest of ``'bitmask'`` and ``'delta'`` (gaps as
        uint8 or uint16 tokens); either can be forced, e.g. to compare them.
      compress: try zlib and lzma (with and without a byte shuffle) on every stream and keep the
        smallest; ``False`` stores streams raw.

    Returns:
      A :class:`SaveReport`: the bytes written, the largest absolute error a lossy mode caused,
      and how each leaf was stored.

    Raises:
      ValueError: on an unknown option, a BCOO with batch/dense dimensions or duplicate indices,
        or values beyond float16's range with ``values='float16'``.
      TypeError: on a leaf or dict key of an unsupported type, or a non-numeric dtype.

    Example:
      >>> import os, tempfile
      >>> import jax.numpy as jnp
      >>> from jax.experimental.sparse import BCOO
      >>> from jaxprune.storage import load, save
      >>> w = jnp.array([[0.0, 1.5], [0.0, -2.0]])
      >>> tree = {"Dense_0": {"kernel": BCOO.fromdense(w), "bias": jnp.zeros(2)}}
      >>> path = os.path.join(tempfile.mkdtemp(), "model.jxp")
      >>> report = save(path, tree)
      >>> [(r.path, r.kind, r.nnz) for r in report.leaves]
      [('Dense_0/kernel', 'bcoo', 2), ('Dense_0/bias', 'dense', 2)]
      >>> kernel = load(path)["Dense_0"]["kernel"]
      >>> kernel.indices.tolist(), kernel.data.tolist()
      ([[0, 1], [1, 1]], [1.5, -2.0])
    """
    if values not in _VALUE_MODES:
        raise ValueError(f"save: values={values!r}; expected one of {_VALUE_MODES}")
    if index not in _INDEX_MODES:
        raise ValueError(f"save: index={index!r}; expected one of {_INDEX_MODES}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"save: bits={bits!r}; expected an int from 1 to 8")
    opts = {"values": values, "bits": bits, "index": index, "compress": bool(compress)}
    blob, reports = _encode(tree, opts)
    path = os.fspath(path)
    _write_atomically(path, blob)
    error = max((r.max_abs_error for r in reports), default=0.0)
    return SaveReport(path, len(blob), error, tuple(reports))


def load(path: str | os.PathLike) -> Any:
    """Reads a file written by :func:`save`.

    Args:
      path: the file to read.

    Returns:
      The saved tree: BCOO leaves come back as ``BCOO`` with their entries in row-major order
      (as saved if they were sorted), ``nse`` = stored entries, and the same
      ``indices_sorted``/``unique_indices`` flags, so the same pytree structure; dense leaves as ``jax.Array`` (a 64-bit leaf read
      while ``jax_enable_x64`` is off comes back as ``np.ndarray``, so that no bits are lost).
      Dicts, lists, tuples and ``None`` come back as such; an NNX ``State`` comes back as its
      pure nested dict, which ``nnx.update(model, tree)`` accepts.

    Raises:
      FileFormatError: (a ValueError) if the file is of another format, has a newer format version,
        is truncated, or fails its checksum.
      ValueError: for a BCOO of 64-bit values while ``jax_enable_x64`` is off.
      OSError: if the file cannot be read.

    Example:
      >>> import os, tempfile
      >>> import numpy as np
      >>> from jaxprune.storage import load, save
      >>> path = os.path.join(tempfile.mkdtemp(), "params.jxp")
      >>> _ = save(path, {"layers": {0: {"kernel": np.eye(2, dtype=np.float32)}}})
      >>> load(path)["layers"][0]["kernel"].tolist()
      [[1.0, 0.0], [0.0, 1.0]]
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        blob = f.read()
    return _decode(blob, repr(path))
