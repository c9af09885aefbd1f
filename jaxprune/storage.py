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
untrusted file can at worst raise an error: ``docs/format.md`` specifies every field, and the
decoder checks all of it before allocating, decompressing no further than the declared sizes.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import zlib
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from jax.experimental.sparse import BCOO

from jaxprune._atomic import BINARY, write_atomically
from jaxprune._codecs import FileFormatError, _check_object, _Payload
from jaxprune._manifest import (
    _build_tree,
    _decode_leaf,
    _encode_bcoo,
    _encode_dense,
    _encode_node,
    _Leaf,
    _parse_leaf,
    _parse_tree,
)
from jaxprune._text import table

__all__ = ["FORMAT_VERSION", "FileFormatError", "LeafReport", "SaveReport", "load", "save"]

FORMAT_VERSION = 1
"""The newest file format version this module writes and reads."""

_MAGIC = b"JAXPRUNE"
_HEADER = struct.Struct("<8sHIQ")  # magic, version, manifest length, payload length
_CRC = struct.Struct("<I")
_VALUE_MODES = ("exact", "float16", "shared")
_INDEX_MODES = ("auto", "bitmask", "delta")
_CHUNK = 1 << 20
_MAX_MANIFEST = 1 << 25  # about 100,000 leaves; parsed JSON takes many times its bytes
_MAX_JSON_DEPTH = 2 * 100 + 8  # two JSON levels per tree container, plus the leaf entries
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)
# A FIFO opened for reading blocks until a writer comes; non-blocking, it opens and is refused.
_READ = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | BINARY


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
        header = ("path", "kind", "index", "values", "nnz", "bytes")
        body = [
            (r.path, r.kind, r.index_encoding, r.value_encoding, f"{r.nnz:,}", f"{r.nbytes:,}")
            for r in self.leaves
        ]
        total = f"total {self.nbytes} bytes, max abs error {self.max_abs_error:.3g}"
        return table(header, body, left=4) + "\n" + total


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
    if len(manifest) > _MAX_MANIFEST:
        raise ValueError(
            f"save: the manifest of {len(entries)} leaves takes {len(manifest)} bytes, more than "
            f"the {_MAX_MANIFEST} a file may hold; expected fewer leaves (stack layers together)"
        )
    body = b"".join(
        [
            _HEADER.pack(_MAGIC, FORMAT_VERSION, len(manifest), payload.size),
            manifest,
            *payload.parts,
        ]
    )
    return body + _CRC.pack(zlib.crc32(body)), reports


def _read_exact(f: BinaryIO, offset: int, length: int) -> bytes:
    f.seek(offset)
    data = f.read(length)
    if len(data) != length:
        raise FileFormatError(f"the file ends at byte {offset + len(data)}, inside a part")
    return data


def _read_header(f: BinaryIO, size: int, name: str) -> tuple[int, int, int]:
    """(version, manifest length, payload length), once they agree with the file's size."""
    head = f.read(_HEADER.size)
    if head[: len(_MAGIC)] != _MAGIC[: len(head)]:
        raise FileFormatError(
            f"{name} is not a jaxprune model file: it starts with {head[:8]!r}, expected {_MAGIC!r}"
        )
    if len(head) < _HEADER.size:
        raise FileFormatError(f"{name} is truncated: {size} bytes, shorter than the header")
    _, version, manifest_len, payload_len = _HEADER.unpack(head)
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{name} has format version {version}, newer than this jaxprune reads "
            f"(up to {FORMAT_VERSION}); upgrade jaxprune to load it"
        )
    if version < 1:
        raise FileFormatError(f"{name} has an invalid format version {version}")
    expected = _HEADER.size + manifest_len + payload_len + _CRC.size
    if size != expected:
        what = "truncated" if size < expected else "corrupted (trailing bytes)"
        raise FileFormatError(f"{name} is {what}: {size} bytes, expected {expected}")
    if manifest_len > _MAX_MANIFEST:
        raise FileFormatError(
            f"{name} has a manifest of {manifest_len} bytes, more than the {_MAX_MANIFEST} allowed"
        )
    return version, manifest_len, payload_len


def _checksum_matches(f: BinaryIO, end: int) -> bool:
    f.seek(0)
    crc = 0
    for start in range(0, end, _CHUNK):
        crc = zlib.crc32(f.read(min(_CHUNK, end - start)), crc)
    (stored,) = _CRC.unpack(f.read(_CRC.size))
    return crc == stored


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    fields = dict(pairs)
    if len(fields) != len(pairs):
        seen = [key for i, (key, _) in enumerate(pairs) if key in dict(pairs[:i])]
        raise FileFormatError(f"the manifest repeats the field {seen[0]!r} in one object")
    return fields


def _no_constant(name: str) -> None:
    raise FileFormatError(f"the manifest holds {name}, which is not JSON")


def _parse_json(data: bytes) -> Any:
    """The manifest's JSON: UTF-8, nesting checked before parsing, no repeated fields."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"the manifest is not UTF-8: {e}") from e
    brackets = np.frombuffer(re.sub(r'"(?:[^"\\]|\\.)*"', "", text).encode(), np.uint8)
    nesting = np.isin(brackets, _OPEN).astype(np.int64) - np.isin(brackets, _CLOSE)
    if np.max(np.cumsum(nesting), initial=0) > _MAX_JSON_DEPTH:
        raise FileFormatError(f"the manifest nests JSON deeper than {_MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, object_pairs_hook=_unique_fields, parse_constant=_no_constant)
    except FileFormatError:
        raise
    except ValueError as e:
        raise FileFormatError(f"the manifest is not valid JSON: {e}") from e


def _parse_manifest(manifest: Any, version: int, payload_len: int) -> tuple[dict, list[_Leaf]]:
    """The checked tree and leaves of a manifest whose parts tile the payload exactly."""
    manifest = _check_object(manifest, ("format", "version", "tree", "leaves"), "the manifest")
    if manifest["format"] != "jaxprune" or manifest["version"] != version:
        raise FileFormatError(
            f"the manifest says format {manifest['format']!r} version {manifest['version']!r}; "
            f"expected 'jaxprune' version {version}, as the header"
        )
    entries = manifest["leaves"]
    if not isinstance(entries, list):
        raise FileFormatError("the manifest's leaves is not a list")
    paths: dict[int, str] = {}
    _parse_tree(manifest["tree"], len(entries), paths)
    if len(paths) != len(entries):
        missing = sorted(set(range(len(entries))) - set(paths))
        raise FileFormatError(f"leaves {missing[:5]} of the manifest are not in the tree")
    leaves = [_parse_leaf(entry, paths[i]) for i, entry in enumerate(entries)]
    position = 0
    for leaf in leaves:
        for part in (part for stream in leaf.streams for part in stream.parts):
            if part.offset != position:
                raise FileFormatError(
                    f"leaf '{leaf.path}': a part starts at payload byte {part.offset}, expected "
                    f"{position} (parts follow one another in manifest order)"
                )
            position += part.length
    if position != payload_len:
        raise FileFormatError(f"the parts cover {position} bytes of the {payload_len}-byte payload")
    return manifest["tree"], leaves


def _decode(f: BinaryIO, size: int, name: str) -> Any:
    """The tree in an open model file of ``size`` bytes; ``name`` is for errors."""
    version, manifest_len, payload_len = _read_header(f, size, name)
    if not _checksum_matches(f, size - _CRC.size):
        raise FileFormatError(f"{name} is corrupted: checksum mismatch")
    base = _HEADER.size + manifest_len
    try:
        manifest = _parse_json(_read_exact(f, _HEADER.size, manifest_len))
        tree, leaves = _parse_manifest(manifest, version, payload_len)

        def read(offset: int, length: int) -> bytes:
            return _read_exact(f, base + offset, length)

        return _build_tree(tree, [_decode_leaf(read, leaf) for leaf in leaves])
    except FileFormatError as e:
        raise FileFormatError(f"{name}: {e}") from e


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
      path: the file to write; an existing file is replaced only once the new one is complete
        (through a symlink, its target). It gets the umask's permissions.
      tree: a pytree of ``jax.Array``/``np.ndarray`` and ``BCOO`` leaves, e.g. the output of
        ``jaxprune.sparse.to_bcoo`` or a Linen params dict or ``nnx.state(model, nnx.Param)``.
      values: ``'exact'`` (default) keeps every value bit-exact. ``'float16'`` rounds the weights to
        half precision; ``'shared'`` replaces them by ``2**bits`` shared values per leaf found by
        1-D k-means (Han et al. 2016, Deep Compression). Lossy modes touch weights only (BCOO
        leaves and floating leaves named ``kernel`` or ``embedding``); biases stay exact.
      bits: code width for ``values='shared'``, 1 to 8.
      index: ``'auto'`` picks per leaf the smallest of ``'bitmask'`` and ``'delta'`` (gaps as
        uint8 or uint16 tokens); either can be forced, e.g. to compare them.
      compress: split every stream into byte planes and store each raw, zlib or lzma: the
        smallest of the three for planes under 128 KiB, raw or fast deflate for larger ones
        (decided on a sample, compressed once: save stays near a raw write's time); ``False`` stores streams raw, as one plane.

    Returns:
      A :class:`SaveReport`: the bytes written, the largest absolute error a lossy mode caused,
      and how each leaf was stored.

    Raises:
      ValueError: on an unknown option, a BCOO with batch/dense dimensions, duplicate indices or
        an index outside its shape (JAX's padding, the shape itself, is dropped), a tree nested
        deeper than 100 containers, or values beyond float16's range with ``values='float16'``.
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
    write_atomically(path, blob)
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
      FileFormatError: (a ValueError) if the path is not a regular file, or the file is of
        another format, has a newer format version, is truncated, fails its checksum, or breaks
        any rule of ``docs/format.md``; also for a BCOO of 64-bit values or indices while
        ``jax_enable_x64`` is off. The message names the leaf and the field.
      OSError: if the file cannot be opened.

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
    _check_regular(os.stat(path), repr(path))
    with os.fdopen(os.open(path, _READ), "rb") as f:
        info = os.fstat(f.fileno())
        _check_regular(info, repr(path))
        return _decode(f, info.st_size, repr(path))


def _check_regular(info: os.stat_result, name: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a device"}
        kind = next((k for test, k in kinds.items() if test(info.st_mode)), "not a file")
        raise FileFormatError(f"{name} is {kind}, not a regular file; expected a model file")
