"""Codecs of the model file: byte planes, zlib/lzma streams and index encodings.

Pure functions over numpy arrays and bytes; :mod:`jaxprune.storage` puts them in a file. Every
decoder here checks a manifest entry before it allocates (``_parse_*``) and then reads the payload
a bounded piece at a time, never decompressing past the size the entry declares
(``docs/format.md`` is the specification).
"""

from __future__ import annotations

import lzma
import math
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np

# lc=lp=pb=0: the streams here are byte planes and gap tokens, which have no use for the literal
# context bits that help lzma on text; measured a few percent smaller on pruned LeNet layers.
_LZMA_OPTIONS = {"id": lzma.FILTER_LZMA2, "preset": 6, "lc": 0, "lp": 0, "pb": 0}
_LZMA_MAX_DICT = 1 << 23  # preset 6's dictionary
# The most bytes one stored byte can decompress to. Deflate codes a 258-byte match in 2 bits at
# least; LZMA2's range coder needs about 0.3 bits for a 273-byte repeat match (about 7,100x, and
# 6,900x measured on zeros), doubled for margin. A part declaring more cannot be honest.
_MAX_RATIO = {"raw": 1, "zlib": 1032, "lzma": 1 << 14}
_MAX_U64 = (1 << 64) - 1
_CHUNK = (
    1 << 18
)  # bytes read or decompressed at a time: bounds what a load holds besides its arrays
_POSITIONS = 1 << 16  # positions or codes decoded at a time; a multiple of 8
_ALIGN = 64
_INDEX_TOKENS = {"bitmask": np.uint8, "delta8": np.uint8, "delta16": np.uint16}


class FileFormatError(ValueError):
    """A file that is not a readable jaxprune model: other format, newer, truncated, corrupted."""


# ----------------------------------------------------------------------------- byte streams


def _pack(arr: np.ndarray, *, compress: bool) -> tuple[dict[str, Any], list[bytes]]:
    """A stream as byte planes, each stored raw, zlib or lzma (see ``_smallest``).

    With ``compress``, an array of k-byte items is split into k planes (byte i of every item):
    the sign/exponent plane of weights that survived magnitude pruning spans few values and
    compresses well, while low mantissa planes are noise and are stored raw untried.
    """
    raw = np.ascontiguousarray(arr).tobytes()
    planes = arr.dtype.itemsize if compress and raw else 1
    data = np.frombuffer(raw, np.uint8).reshape(-1, planes).T if raw else [raw]
    parts = [_smallest(bytes(plane), compress=compress) for plane in data]
    entry = {"planes": planes, "raw_length": len(raw), "parts": [[c, len(p)] for c, p in parts]}
    return entry, [p for _, p in parts]


# Planes from this size on get fast deflate (level 1) only, once: trying zlib-6 and lzma on the
# whole of every plane made save() 14x a raw write at 4M-100M weights at 10% kept (lzma runs at
# 1.4-4.5 MB/s on these planes). On a 2048x2048 layer at 10% kept, level 1 against the smallest
# of zlib-6 and lzma: sign/exponent plane 0.226 vs 0.139 of its bytes, bitmask 0.583 vs 0.484;
# the whole file about 6% larger, and save() about 2x the raw write instead of 14x.
_FAST_FROM = 1 << 17
_FAST_LEVEL = 1
# A large plane is stored raw unless deflate shrinks a sample of it below this fraction.
_WORTH_COMPRESSING = 0.97
_SAMPLES, _SAMPLE_BYTES = 8, 1 << 12


def _smallest(data: bytes, *, compress: bool) -> tuple[str, bytes]:
    """The plane raw, zlib or lzma: the smallest of the three, or for a plane of ``_FAST_FROM``
    bytes or more, raw or fast deflate as a sample of it predicts, compressed once."""
    if not compress or not data or _looks_random(data):
        return "raw", data
    if len(data) < _FAST_FROM:
        candidates = (("raw", data), ("zlib", _zlib(data)), ("lzma", _lzma(data)))
        return min(candidates, key=lambda c: len(c[1]))
    step = (len(data) - _SAMPLE_BYTES) // (_SAMPLES - 1)
    sample = b"".join(data[i * step : i * step + _SAMPLE_BYTES] for i in range(_SAMPLES))
    if len(_zlib(sample, _FAST_LEVEL)) > _WORTH_COMPRESSING * len(sample):
        return "raw", data
    packed = _zlib(data, _FAST_LEVEL)
    return ("raw", data) if len(packed) >= len(data) else ("zlib", packed)


def _looks_random(data: bytes) -> bool:
    # Trying lzma on a large plane of uniform noise takes seconds and gains nothing.
    if len(data) < 1 << 16:
        return False
    p = np.bincount(np.frombuffer(data, np.uint8), minlength=256) / len(data)
    return float(-np.sum(p[p > 0] * np.log2(p[p > 0]))) > 7.9


class _Payload:
    """The concatenated streams of a file; each entry records where its parts lie."""

    def __init__(self, *, compress: bool):
        self.compress = compress
        self.parts: list[bytes] = []
        self.size = 0

    def append(self, entry: dict[str, Any], packed: list[bytes]) -> dict[str, Any]:
        parts = []
        for (codec, length), data in zip(entry["parts"], packed, strict=True):
            parts.append([codec, self.size, length])
            self.parts.append(data)
            self.size += length
        return {**entry, "parts": parts}

    def add(self, arr: np.ndarray) -> dict[str, Any]:
        return self.append(*_pack(arr, compress=self.compress))


def _zlib(data: bytes, level: int = 6) -> bytes:
    co = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw deflate: the file has its own checksum
    return co.compress(data) + co.flush()


def _lzma_filters(raw_length: int) -> list[dict[str, Any]]:
    # A dictionary no larger than the stream: a full 8 MiB one costs ~30 ms to set up per small
    # stream. The decoder derives the same size from the stored raw length.
    dict_size = min(_LZMA_MAX_DICT, max(4096, 1 << (raw_length - 1).bit_length()))
    return [{**_LZMA_OPTIONS, "dict_size": dict_size}]


def _lzma(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_lzma_filters(len(data)))


Read = Callable[[int, int], bytes]
"""``read(offset, length)``: exactly ``length`` bytes of the payload from ``offset``."""


class Part(NamedTuple):
    """One byte plane of a stream, where the manifest places it in the payload."""

    codec: str
    offset: int
    length: int


class Stream(NamedTuple):
    """A checked stream entry: ``count`` items of ``dtype`` stored as ``len(parts)`` byte planes."""

    dtype: np.dtype
    count: int  # type: ignore[assignment]  # a field named like tuple.count
    parts: tuple[Part, ...]


def _check_int(value: Any, what: str, low: int, high: int) -> int:
    """``value`` if it is an int (not a bool) from ``low`` to ``high``.

    Example:
      >>> _check_int(3, "nnz", 0, 10)
      3
      >>> _check_int(True, "nnz", 0, 10)
      Traceback (most recent call last):
      jaxprune._codecs.FileFormatError: nnz is True; expected an int from 0 to 10
    """
    if type(value) is not int or not low <= value <= high:
        raise FileFormatError(f"{what} is {value!r}; expected an int from {low} to {high}")
    return value


def _check_object(entry: Any, keys: tuple[str, ...], what: str) -> dict[str, Any]:
    """``entry`` if it is a JSON object with exactly the fields ``keys``."""
    if not isinstance(entry, dict) or set(entry) != set(keys):
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise FileFormatError(f"{what} has fields {got}; expected exactly {sorted(keys)}")
    return entry


def _parse_part(part: Any, plane_length: int, what: str) -> Part:
    if not isinstance(part, list) or len(part) != 3:
        raise FileFormatError(f"{what} is {part!r}; expected [codec, offset, length]")
    codec, offset, length = part
    if not isinstance(codec, str) or codec not in _MAX_RATIO:
        raise FileFormatError(f"{what}: codec {codec!r}; expected one of {tuple(_MAX_RATIO)}")
    offset = _check_int(offset, f"{what}: offset", 0, _MAX_U64)
    length = _check_int(length, f"{what}: length", 0, _MAX_U64)
    if codec == "raw" and length != plane_length:
        raise FileFormatError(
            f"{what}: a raw part of {length} bytes for a {plane_length}-byte plane"
        )
    if plane_length > _MAX_RATIO[codec] * length:
        raise FileFormatError(
            f"{what}: {length} bytes of {codec} cannot hold the {plane_length} bytes declared "
            f"(at most {_MAX_RATIO[codec]}x)"
        )
    return Part(codec, offset, length)


def _parse_stream(entry: Any, dtype: np.dtype, counts: tuple[int, int], what: str) -> Stream:
    """Checks a stream entry against the item count its leaf allows, before anything is read.

    Args:
      entry: the manifest's ``{"planes", "raw_length", "parts"}`` object.
      dtype: the stream's item dtype.
      counts: the least and the most items the leaf allows.
      what: where the stream is, for errors (``"leaf 'fc/kernel': values"``).

    Returns:
      The checked :class:`Stream`.

    Raises:
      FileFormatError: naming the field that breaks the format.

    Example:
      >>> entry = {"planes": 1, "raw_length": 8, "parts": [["raw", 0, 8]]}
      >>> _parse_stream(entry, np.dtype("<f4"), (2, 2), "w").count
      2
      >>> _parse_stream(entry, np.dtype("<f4"), (3, 3), "w")
      Traceback (most recent call last):
      jaxprune._codecs.FileFormatError: w: raw_length is 8; expected an int from 12 to 12
    """
    entry = _check_object(entry, ("planes", "raw_length", "parts"), what)
    itemsize = dtype.itemsize
    low, high = counts[0] * itemsize, counts[1] * itemsize
    raw_length = _check_int(entry["raw_length"], f"{what}: raw_length", low, high)
    if raw_length % itemsize:
        raise FileFormatError(f"{what}: raw_length {raw_length} is not a whole number of {dtype}")
    planes = _check_int(entry["planes"], f"{what}: planes", 1, itemsize if raw_length else 1)
    if planes not in (1, itemsize):
        raise FileFormatError(f"{what}: planes is {planes}; expected 1 or {itemsize}")
    parts = entry["parts"]
    if not isinstance(parts, list) or len(parts) != planes:
        raise FileFormatError(f"{what}: parts is not a list of {planes} part(s)")
    plane_length = raw_length // planes
    checked = (_parse_part(p, plane_length, f"{what}, part {i}") for i, p in enumerate(parts))
    return Stream(dtype, raw_length // itemsize, tuple(checked))


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """``np.empty`` on a 64-byte boundary: ``jax.device_put`` on CPU then keeps it, uncopied."""
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(nbytes + _ALIGN, np.uint8)
    start = -buffer.ctypes.data % _ALIGN
    return buffer[start : start + nbytes].view(dtype).reshape(shape)


def _pieces(read: Read, part: Part) -> Iterator[bytes]:
    for start in range(0, part.length, _CHUNK):
        yield read(part.offset + start, min(_CHUNK, part.length - start))


def _inflate(codec: str, pieces: Iterable[bytes], size: int, what: str) -> Iterator[bytes]:
    """Decompresses pieces of one zlib or lzma part in chunks, never past ``size`` bytes.

    Output is asked for in chunks of at most ``size - produced + 1`` bytes, so a part that would
    decompress to more than it declares stops one byte past it.
    """
    is_zlib = codec == "zlib"
    d: Any
    if is_zlib:
        d = zlib.decompressobj(-15)
    else:
        d = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=_lzma_filters(size))
    produced = 0
    try:
        for data in pieces:
            if d.eof:
                raise FileFormatError(f"{what}: bytes after the end of the {codec} stream")
            while True:
                limit = min(_CHUNK, size - produced + 1)
                out = d.decompress(data, limit) if is_zlib else d.decompress(data, max_length=limit)
                data = d.unconsumed_tail if is_zlib else b""
                produced += len(out)
                if produced > size:
                    raise FileFormatError(f"{what}: decompresses past the {size} bytes declared")
                if out:
                    yield out
                more = (data or len(out) == limit) if is_zlib else not d.needs_input and out
                if d.eof or not more:
                    break
    except (zlib.error, lzma.LZMAError) as e:
        raise FileFormatError(f"{what}: does not decompress ({codec}): {e}") from e
    if not d.eof or d.unused_data or produced != size:
        raise FileFormatError(
            f"{what}: the {codec} stream gives {produced} bytes"
            f"{'' if d.eof else ' and ends early'}{' and trailing bytes' if d.unused_data else ''}"
            f", expected {size} bytes"
        )


def _plane_chunks(read: Read, part: Part, plane_length: int, what: str) -> Iterator[bytes]:
    pieces = _pieces(read, part)
    return pieces if part.codec == "raw" else _inflate(part.codec, pieces, plane_length, what)


def _read_stream(read: Read, stream: Stream, what: str) -> np.ndarray:
    """The items of a checked stream, each byte plane written straight into its column.

    Example:
      >>> entry, parts = _pack(np.arange(5, dtype="<i4"), compress=True)
      >>> blob = b"".join(parts)
      >>> offsets = np.cumsum([0] + [len(p) for p in parts])
      >>> entry["parts"] = [[c, int(o), n] for (c, n), o in zip(entry["parts"], offsets)]
      >>> stream = _parse_stream(entry, np.dtype("<i4"), (5, 5), "w")
      >>> _read_stream(lambda o, n: blob[o : o + n], stream, "w").tolist()
      [0, 1, 2, 3, 4]
    """
    out = _aligned_empty((stream.count,), stream.dtype)
    columns = out.view(np.uint8).reshape(stream.count, stream.dtype.itemsize)
    planes = len(stream.parts)
    targets = [columns.reshape(-1)] if planes == 1 else [columns[:, i] for i in range(planes)]
    for i, (part, target) in enumerate(zip(stream.parts, targets, strict=True)):
        position = 0
        for chunk in _plane_chunks(read, part, target.size, f"{what}, part {i}"):
            target[position : position + len(chunk)] = np.frombuffer(chunk, np.uint8)
            position += len(chunk)
    return out


# ----------------------------------------------------------------------------- index encodings


def _gap_tokens(flat: np.ndarray, dtype: type) -> np.ndarray:
    """Gaps between kept flat positions as fixed-width tokens; the top value means 'add it, go on'.

    Deep Compression (Han et al. 2016, Sec. 2) stores relative indices with filler entries for
    large gaps; an escape token does the same without storing a fake weight.
    """
    top = np.iinfo(dtype).max
    gaps = np.diff(flat, prepend=-1) - 1
    escapes = gaps // top
    ends = np.cumsum(escapes + 1) - 1
    tokens: np.ndarray = np.full(int(ends[-1]) + 1 if flat.size else 0, top, dtype)
    tokens[ends] = gaps % top
    return tokens


def _bitmask_positions(
    chunks: Iterable[bytes], nnz: int, size: int, what: str
) -> Iterator[np.ndarray]:
    """The set positions of a little-endian bitmask given in byte chunks, a few at a time.

    Example:
      >>> [p.tolist() for p in _bitmask_positions([bytes([0b101]), bytes([1])], 3, 9, "w")]
      [[0, 2], [8]]
    """
    seen = start = 0
    for chunk in chunks:
        for i in range(0, len(chunk), _POSITIONS // 8):
            piece = np.frombuffer(chunk[i : i + _POSITIONS // 8], np.uint8)
            flat = np.flatnonzero(np.unpackbits(piece, bitorder="little")) + 8 * start
            start += piece.size
            seen += flat.size
            if seen > nnz:
                raise FileFormatError(f"{what}: the bitmask sets more than the {nnz} bits of nnz")
            if flat.size and flat[-1] >= size:
                raise FileFormatError(
                    f"{what}: the bitmask sets bit {flat[-1]}, past the shape's {size} positions"
                )
            yield flat
    if seen != nnz:
        raise FileFormatError(f"{what}: the bitmask sets {seen} bits, nnz is {nnz}")


def _gap_positions(tokens: np.ndarray, nnz: int, size: int, what: str) -> Iterator[np.ndarray]:
    """The kept flat positions that :func:`_gap_tokens` coded, a few at a time.

    The k-th kept position is the sum of the tokens up to its own, plus k.

    Example:
      >>> [p.tolist() for p in _gap_positions(np.array([3, 255, 7], np.uint8), 2, 1000, "w")]
      [[3, 266]]
    """
    top = np.iinfo(tokens.dtype).max
    if tokens.size and tokens[-1] == top:
        raise FileFormatError(f"{what}: the gap tokens end with an escape")
    total = seen = 0
    for i in range(0, tokens.size, _POSITIONS):
        piece = tokens[i : i + _POSITIONS]
        sums = np.cumsum(piece, dtype=np.int64) + total
        ends = np.flatnonzero(piece != top)
        flat = sums[ends] + seen + np.arange(ends.size)
        total, seen = int(sums[-1]), seen + ends.size
        if seen > nnz:
            raise FileFormatError(f"{what}: the gap tokens hold more than the {nnz} entries of nnz")
        if flat.size and flat[-1] >= size:
            raise FileFormatError(
                f"{what}: the gap tokens reach position {flat[-1]}, past the shape's {size}"
            )
        yield flat
    if seen != nnz:
        raise FileFormatError(f"{what}: the gap tokens hold {seen} entries, nnz is {nnz}")


def _encode_index(flat: np.ndarray, size: int, mode: str, payload: _Payload) -> dict[str, Any]:
    candidates = []
    if mode in ("auto", "bitmask"):
        mask = np.zeros(size, bool)
        mask[flat] = True
        candidates.append(("bitmask", np.packbits(mask, bitorder="little")))
    if mode in ("auto", "delta"):
        # Of the two token widths, the one with fewer raw bytes: uint16 wins only when gaps of
        # 255 or more are common, i.e. at very low density.
        tokens8, tokens16 = _gap_tokens(flat, np.uint8), _gap_tokens(flat, np.uint16)
        if tokens8.nbytes <= tokens16.nbytes:
            candidates.append(("delta8", tokens8))
        else:
            candidates.append(("delta16", tokens16))
    packed = [(name, *_pack(arr, compress=payload.compress)) for name, arr in candidates]
    name, entry, data = min(packed, key=lambda c: sum(map(len, c[2])))
    return {"encoding": name, "stream": payload.append(entry, data)}


def _parse_index(entry: Any, nnz: int, size: int, what: str) -> tuple[str, Stream]:
    """Checks a BCOO leaf's ``{"encoding", "stream"}`` entry; returns (encoding, stream)."""
    entry = _check_object(entry, ("encoding", "stream"), f"{what}: index")
    encoding = entry["encoding"]
    if not isinstance(encoding, str) or encoding not in _INDEX_TOKENS:
        raise FileFormatError(
            f"{what}: index encoding {encoding!r}; expected one of {tuple(_INDEX_TOKENS)}"
        )
    dtype = np.dtype(_INDEX_TOKENS[encoding])
    if encoding == "bitmask":
        counts = ((size + 7) // 8,) * 2
    else:  # one token per entry, plus at most one escape per `top` positions skipped
        counts = (nnz, nnz + max(size - 1, 0) // int(np.iinfo(dtype.type).max))
    return encoding, _parse_stream(entry["stream"], dtype, counts, f"{what}: index stream")


def _positions(
    read: Read, encoding: str, stream: Stream, nnz: int, size: int, what: str
) -> Iterator[np.ndarray]:
    """The kept flat positions of a BCOO leaf, increasing, in pieces of at most 65,536."""
    if encoding == "bitmask":
        chunks = _plane_chunks(read, stream.parts[0], stream.count, f"{what}: bitmask")
        return _bitmask_positions(chunks, nnz, size, what)
    return _gap_positions(_read_stream(read, stream, what), nnz, size, what)
