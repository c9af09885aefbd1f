"""The manifest of a model file: its tree and leaf entries, written by save and checked by load.

``docs/format.md`` is the specification. The ``_parse_*`` functions check every rule of it on the
parsed JSON, before a byte of the payload is read or an array allocated; ``_decode_leaf`` then
reads a checked leaf.
"""

from __future__ import annotations

import functools
import math
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
    Read,
    Stream,
    _aligned_empty,
    _check_int,
    _check_object,
    _encode_index,
    _parse_index,
    _Payload,
    _positions,
)
from jaxprune._tree import WEIGHT_NAMES, last_key
from jaxprune._values import (
    Values,
    _decode_values,
    _encode_values,
    _max_abs_error,
    _parse_values,
)

_MAX_DEPTH = 100  # containers above a node; JSON parsing and recursion stay far from their limits
_MAX_NDIM = 64  # numpy's limit
_MAX_ELEMENTS = 1 << 48  # per dimension and per leaf
_DENSE_KEYS = ("kind", "path", "shape", "dtype", "values")
_BCOO_KEYS = (*_DENSE_KEYS, "index_dtype", "nnz", "indices_sorted", "unique_indices", "index")


# ----------------------------------------------------------------------------- dtypes


def _dtype_table() -> dict[str, np.dtype]:
    """Every dtype a file may name: numpy's numeric dtypes and ml_dtypes' (bfloat16, float8...)."""
    table = {}
    for code in "?bBhHiIlLqQefdgFDG":
        name = np.dtype(code).name
        table[name] = np.dtype(name).newbyteorder("<")
    for name in ml_dtypes.__all__:
        try:
            dtype = np.dtype(getattr(ml_dtypes, name))
        except TypeError:
            continue
        if dtype.name == name:
            table[name] = dtype
    return table


_DTYPES = _dtype_table()


def _dtype_name(dtype: np.dtype, where: str) -> str:
    if dtype.name in _DTYPES:
        return dtype.name
    raise TypeError(
        f"save: leaf '{where}' has dtype {dtype}; expected a numeric dtype "
        "(bool, int, float, complex)"
    )


def _dtype_from_name(name: Any, what: str) -> np.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise FileFormatError(f"{what} is {name!r}; expected a numeric dtype name like 'float32'")
    return _DTYPES[name]


def _little_endian(arr: np.ndarray) -> np.ndarray:
    return arr.astype(arr.dtype.newbyteorder("<")) if arr.dtype.kind in "biufc" else arr


@functools.cache
def _jax_dtype(dtype: np.dtype) -> np.dtype | None:
    """The dtype jax gives an array of ``dtype`` now (64 bits become 32 without x64), or None."""
    try:
        return np.dtype(jax.device_put(np.zeros(0, dtype)).dtype)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- leaves: save


def _lossy(mode: str, dtype: np.dtype, path: str, sparse: bool) -> str:
    # Lossy modes touch weights only (exported BCOO kernels and leaves with a Flax weight name);
    # biases, norm scales and other small leaves stay exact, as in Deep Compression (Han et al.
    # 2016).
    weight = sparse or last_key(path) in WEIGHT_NAMES
    return mode if jnp.issubdtype(dtype, jnp.floating) and weight else "exact"


def _kept_entries(indices: np.ndarray, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Which entries of a BCOO are real: all but JAX's padding, whose index is the shape itself.

    Raises:
      ValueError: for any other index outside the shape (a negative one included).
    """
    bounds = np.asarray(shape, np.int64)
    inside = np.all((indices >= 0) & (indices < bounds), axis=1)
    padding = np.all(indices == bounds, axis=1)
    outside = np.flatnonzero(~(inside | padding))
    if outside.size:
        row = int(outside[0])
        raise ValueError(
            f"save: leaf '{where}' has entry {row} at index {indices[row].tolist()}, outside its "
            f"shape {shape}; expected indices from 0 to shape - 1 (or the shape itself, JAX's "
            "padding, which stores nothing)"
        )
    return inside


def _encode_bcoo(leaf: BCOO, where: str, opts: dict, payload: _Payload):
    if leaf.n_batch or leaf.n_dense:
        raise ValueError(
            f"save: leaf '{where}' is a BCOO with n_batch={leaf.n_batch}, n_dense={leaf.n_dense}; "
            "expected n_batch=0 and n_dense=0 (convert it with "
            "jax.experimental.sparse.bcoo_update_layout(x, n_batch=0, n_dense=0))"
        )
    shape = tuple(int(d) for d in leaf.shape)
    if not shape:
        raise ValueError(f"save: leaf '{where}' is a 0-d BCOO; expected 1 or more dimensions")
    size = math.prod(shape)
    indices = np.asarray(leaf.indices).reshape(-1, len(shape))
    if indices.dtype.kind not in "iu" or max(shape) - 1 > np.iinfo(indices.dtype).max:
        raise ValueError(
            f"save: leaf '{where}' has {indices.dtype} indices, which cannot hold every position "
            f"of its shape {shape}; expected an integer dtype (cast them, e.g. to int32)"
        )
    data = np.asarray(leaf.data)
    inside = _kept_entries(indices, shape, where)
    flat = np.ravel_multi_index(tuple(indices[inside].T), shape)
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
        "index_dtype": _dtype_name(indices.dtype, where),
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


# ----------------------------------------------------------------------------- leaves: load


class _Leaf(NamedTuple):
    """A checked leaf entry; ``index`` and ``index_dtype`` are None for a dense leaf."""

    path: str
    kind: str
    shape: tuple[int, ...]
    dtype: np.dtype
    nnz: int
    values: Values
    index: tuple[str, Stream] | None = None  # type: ignore[assignment]  # like tuple.index
    index_dtype: np.dtype | None = None
    flags: dict[str, bool] | None = None

    @property
    def streams(self) -> tuple[Stream, ...]:
        """The leaf's streams in payload order: the index (of a BCOO), then the values."""
        return ((self.index[1],) if self.index else ()) + self.values.streams


def _parse_shape(shape: Any, what: str) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > _MAX_NDIM:
        raise FileFormatError(
            f"{what}: shape is {shape!r}; expected a list of {_MAX_NDIM} ints at most"
        )
    dims = tuple(
        _check_int(d, f"{what}: shape[{i}]", 0, _MAX_ELEMENTS) for i, d in enumerate(shape)
    )
    # Over the nonzero dims: numpy refuses a shape like [0, 2**48, 2**48] as too big.
    if math.prod(d for d in dims if d) > _MAX_ELEMENTS:
        raise FileFormatError(
            f"{what}: shape {list(dims)} is too large: its nonzero dims multiply past {_MAX_ELEMENTS}"
        )
    return dims


def _bcoo_dtypes(entry: dict, dtype: np.dtype, shape: tuple[int, ...], what: str):
    """The value and index dtypes a BCOO leaf loads with, checked against what jax holds."""
    index_dtype = _dtype_from_name(entry["index_dtype"], f"{what}: index_dtype")
    if index_dtype.kind not in "iu" or max(shape) - 1 > np.iinfo(index_dtype).max:
        raise FileFormatError(
            f"{what}: index_dtype {index_dtype.name} cannot hold every position of shape "
            f"{list(shape)}; expected an integer dtype that holds {max(shape) - 1}"
        )
    loaded = _jax_dtype(index_dtype)
    if _jax_dtype(dtype) != dtype or max(shape) - 1 > np.iinfo(loaded).max:
        raise FileFormatError(
            f"{what} is a BCOO of {dtype} values with {index_dtype} indices, which jax does not "
            "hold as they are; for 64 bits enable jax_enable_x64 "
            "(jax.config.update('jax_enable_x64', True)) to load it"
        )
    return loaded


def _parse_leaf(entry: Any, path: str) -> _Leaf:
    """Checks one entry of the manifest's ``leaves``; ``path`` is where the tree puts it.

    Raises:
      FileFormatError: naming the leaf and the field that breaks the format.
    """
    what = f"leaf '{path}'"
    kind = entry.get("kind") if isinstance(entry, dict) else None
    if kind not in ("dense", "bcoo"):
        raise FileFormatError(f"{what}: kind is {kind!r}; expected 'dense' or 'bcoo'")
    entry = _check_object(entry, _DENSE_KEYS if kind == "dense" else _BCOO_KEYS, what)
    if entry["path"] != path:
        raise FileFormatError(f"{what}: its entry says path {entry['path']!r}")
    shape = _parse_shape(entry["shape"], what)
    size = math.prod(shape)
    dtype = _dtype_from_name(entry["dtype"], f"{what}: dtype")
    floating = bool(jnp.issubdtype(dtype, jnp.floating))
    if kind == "dense":
        return _Leaf(
            path,
            kind,
            shape,
            dtype,
            size,
            _parse_values(entry["values"], dtype, size, floating, what),
        )
    if not shape:
        raise FileFormatError(f"{what}: a BCOO leaf has shape []; expected 1 or more dimensions")
    index_dtype = _bcoo_dtypes(entry, dtype, shape, what)
    nnz = _check_int(entry["nnz"], f"{what}: nnz", 0, size)
    flags = {k: entry[k] for k in ("indices_sorted", "unique_indices")}
    for key, flag in flags.items():
        if type(flag) is not bool:
            raise FileFormatError(f"{what}: {key} is {flag!r}; expected true or false")
    index = _parse_index(entry["index"], nnz, size, what)
    values = _parse_values(entry["values"], dtype, nnz, floating, what)
    return _Leaf(path, kind, shape, dtype, nnz, values, index, index_dtype, flags)


def _decode_leaf(read: Read, leaf: _Leaf) -> Any:
    """A checked leaf as loaded: a jax array (numpy where jax would change its dtype), or a BCOO."""
    what = f"leaf '{leaf.path}'"
    if leaf.kind == "dense":
        values = _decode_values(read, leaf.values, leaf.dtype, leaf.nnz, what).reshape(leaf.shape)
        # Without jax_enable_x64, jax would cut a 64-bit leaf to 32 bits; numpy keeps it.
        return jax.device_put(values) if _jax_dtype(leaf.dtype) == leaf.dtype else values
    assert leaf.index is not None and leaf.index_dtype is not None  # _parse_leaf: sparse has both
    indices = _aligned_empty((leaf.nnz, len(leaf.shape)), leaf.index_dtype)
    start = 0
    for flat in _positions(read, *leaf.index, leaf.nnz, math.prod(leaf.shape), what):
        indices[start : start + flat.size] = np.stack(np.unravel_index(flat, leaf.shape), axis=1)
        start += flat.size
    values = _decode_values(read, leaf.values, leaf.dtype, leaf.nnz, what)
    data = (jax.device_put(values), jax.device_put(indices))
    return BCOO(data, shape=leaf.shape, **(leaf.flags or {}))


# ----------------------------------------------------------------------------- tree structure


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _encode_node(node: Any, path: str, visit, depth: int = 0) -> dict[str, Any]:
    """Manifest form of the tree: dicts (str/int keys), lists, tuples, None and leaves."""
    if isinstance(node, nnx.Variable):
        # An NNX Param & co. is stored as its value; load gives the pure nested dict.
        return _encode_node(node.get_value(), path, visit, depth)
    if node is None:
        return {"t": "none"}
    if isinstance(node, (BCOO, jax.Array, np.ndarray, np.generic)):
        return {"t": "leaf", "i": visit(node, path or "<root>")}
    if depth >= _MAX_DEPTH and isinstance(node, (Mapping, list, tuple)):
        raise ValueError(
            f"save: the tree is nested deeper than {_MAX_DEPTH} containers at '{path}'; "
            "expected a flatter tree (or a cycle: a container inside itself)"
        )
    if isinstance(node, Mapping):
        keys = list(node.keys())
        for key in keys:
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise TypeError(
                    f"save: key {key!r} under '{path or '<root>'}' is a {type(key).__name__}; "
                    "expected str or int dict keys"
                )
        values = [_encode_node(node[k], _join(path, k), visit, depth + 1) for k in keys]
        return {"t": "dict", "k": keys, "v": values}
    if type(node) in (list, tuple):
        values = [_encode_node(v, _join(path, i), visit, depth + 1) for i, v in enumerate(node)]
        return {"t": type(node).__name__, "v": values}
    raise TypeError(
        f"save: leaf '{path or '<root>'}' is a {type(node).__name__}; expected a jax/numpy array, "
        "a BCOO, None, or a dict/list/tuple of them"
    )


def _parse_tree(node: Any, n_leaves: int, paths: dict[int, str], path: str = "", depth: int = 0):
    """Checks the manifest's ``tree`` and records in ``paths`` where each leaf index sits.

    Raises:
      FileFormatError: for a node of another form, keys that are not distinct str/int, nesting
        deeper than the limit, or a leaf index out of range or used twice.
    """
    what = f"tree node '{path or '<root>'}'"
    kind = node.get("t") if isinstance(node, dict) else None
    if kind == "none":
        _check_object(node, ("t",), what)
        return
    if kind == "leaf":
        _check_object(node, ("t", "i"), what)
        i = _check_int(node["i"], f"{what}: leaf index ({n_leaves} leaves)", 0, n_leaves - 1)
        if i in paths:
            raise FileFormatError(f"{what}: leaf {i} is already at '{paths[i]}'")
        paths[i] = path or "<root>"
        return
    if kind not in ("dict", "list", "tuple"):
        raise FileFormatError(f"{what}: t is {kind!r}; expected dict, list, tuple, leaf or none")
    if depth >= _MAX_DEPTH:
        raise FileFormatError(f"{what}: the tree is nested deeper than {_MAX_DEPTH} containers")
    _check_object(node, ("t", "k", "v") if kind == "dict" else ("t", "v"), what)
    children = node["v"]
    if not isinstance(children, list):
        raise FileFormatError(f"{what}: v is not a list")
    keys = node["k"] if kind == "dict" else list(range(len(children)))
    if not isinstance(keys, list) or len(keys) != len(children):
        raise FileFormatError(f"{what}: k is not a list of {len(children)} keys")
    for key in keys:
        if type(key) not in (str, int):
            raise FileFormatError(
                f"{what}: key {key!r} is a {type(key).__name__}; expected str or int"
            )
    if len(set(keys)) != len(keys):
        raise FileFormatError(f"{what}: a key appears twice in {keys!r}")
    for key, child in zip(keys, children, strict=True):
        _parse_tree(child, n_leaves, paths, _join(path, key), depth + 1)


def _build_tree(node: dict, leaves: list) -> Any:
    """The tree of a checked ``tree`` node with its leaves in place."""
    kind = node["t"]
    if kind == "none":
        return None
    if kind == "leaf":
        return leaves[node["i"]]
    values = [_build_tree(child, leaves) for child in node["v"]]
    if kind == "dict":
        return dict(zip(node["k"], values, strict=True))
    return values if kind == "list" else tuple(values)
