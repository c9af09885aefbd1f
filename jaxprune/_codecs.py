"""Codecs of the model file: byte planes, zlib/lzma streams, index and value encodings.

Pure functions over numpy arrays and bytes; :mod:`jaxprune.storage` puts them in a file.
"""

from __future__ import annotations

import lzma
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

# lc=lp=pb=0: the streams here are byte planes and gap tokens, which have no use for the literal
# context bits that help lzma on text; measured a few percent smaller on pruned LeNet layers.
_LZMA_OPTIONS = {"id": lzma.FILTER_LZMA2, "preset": 6, "lc": 0, "lp": 0, "pb": 0}
_LZMA_MAX_DICT = 1 << 23  # preset 6's dictionary


class FileFormatError(ValueError):
    """A file that is not a readable jaxprune model: other format, newer, truncated, corrupted."""


# ----------------------------------------------------------------------------- byte streams


def _pack(arr: np.ndarray, *, compress: bool) -> tuple[dict[str, Any], list[bytes]]:
    """A stream as byte planes, each stored raw, zlib or lzma, whichever is smallest.

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


def _smallest(data: bytes, *, compress: bool) -> tuple[str, bytes]:
    if not compress or not data or _looks_random(data):
        return "raw", data
    return min(
        (("raw", data), ("zlib", _zlib(data)), ("lzma", _lzma(data))), key=lambda c: len(c[1])
    )


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


def _zlib(data: bytes) -> bytes:
    co = zlib.compressobj(6, zlib.DEFLATED, -15)  # raw deflate: the file has its own checksum
    return co.compress(data) + co.flush()


def _lzma_filters(raw_length: int) -> list[dict[str, Any]]:
    # A dictionary no larger than the stream: a full 8 MiB one costs ~30 ms to set up per small
    # stream. The decoder derives the same size from the stored raw length.
    dict_size = min(_LZMA_MAX_DICT, max(4096, 1 << (raw_length - 1).bit_length()))
    return [{**_LZMA_OPTIONS, "dict_size": dict_size}]


def _lzma(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_lzma_filters(len(data)))


def _read_stream(
    payload: bytes, entry: Mapping[str, Any], dtype: np.dtype, where: str
) -> np.ndarray:
    try:
        planes, raw_length = int(entry["planes"]), int(entry["raw_length"])
        parts = [(str(c), int(o), int(n)) for c, o, n in entry["parts"]]
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"bad stream entry for leaf '{where}': {entry!r}") from e
    if planes not in (1, dtype.itemsize) or len(parts) != planes or raw_length % dtype.itemsize:
        raise FileFormatError(f"bad stream layout for leaf '{where}': {entry!r}")
    plane_length = raw_length // planes
    data = [_read_part(payload, *part, plane_length, where) for part in parts]
    out = np.frombuffer(b"".join(data), np.uint8).reshape(planes, -1).T.tobytes()
    return np.frombuffer(out, dtype).copy()


def _read_part(payload: bytes, codec: str, offset: int, length: int, raw_length: int, where: str):
    if offset < 0 or length < 0 or offset + length > len(payload):
        raise FileFormatError(f"stream of leaf '{where}' lies outside the payload")
    data = payload[offset : offset + length]
    try:
        if codec == "zlib":
            data = zlib.decompressobj(-15).decompress(data, raw_length)
        elif codec == "lzma":
            d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_lzma_filters(raw_length))
            data = d.decompress(data, max_length=raw_length)
        elif codec != "raw":
            raise FileFormatError(f"unknown codec {codec!r} for leaf '{where}'")
    except (zlib.error, lzma.LZMAError) as e:
        raise FileFormatError(f"stream of leaf '{where}' does not decompress: {e}") from e
    if len(data) != raw_length:
        raise FileFormatError(
            f"stream of leaf '{where}' has {len(data)} bytes, expected {raw_length}; file corrupted"
        )
    return data


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
    tokens = np.full(int(ends[-1]) + 1 if flat.size else 0, top, dtype)
    tokens[ends] = gaps % top
    return tokens


def _gaps_to_flat(tokens: np.ndarray, nnz: int, size: int, where: str) -> np.ndarray:
    top = np.iinfo(tokens.dtype).max
    ends = np.flatnonzero(tokens != top)
    if ends.size != nnz or (tokens.size and tokens[-1] == top):
        raise FileFormatError(f"index stream of leaf '{where}' is malformed; file corrupted")
    totals = np.cumsum(tokens, dtype=np.int64)[ends]
    gaps = np.diff(totals, prepend=0)
    flat = np.cumsum(gaps + 1) - 1
    if flat.size and flat[-1] >= size:
        raise FileFormatError(f"index stream of leaf '{where}' points outside its shape")
    return flat


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


def _decode_index(payload: bytes, entry: Mapping[str, Any], nnz: int, size: int, where: str):
    encoding = entry.get("encoding")
    if encoding == "bitmask":
        bits = _read_stream(payload, entry["stream"], np.dtype(np.uint8), where)
        if bits.size != (size + 7) // 8:
            raise FileFormatError(f"bitmask of leaf '{where}' has the wrong length")
        flat = np.flatnonzero(np.unpackbits(bits, count=size, bitorder="little"))
        if flat.size != nnz:
            raise FileFormatError(f"bitmask of leaf '{where}' has {flat.size} bits set, not {nnz}")
        return flat
    if encoding in ("delta8", "delta16"):
        dtype = np.dtype(np.uint8 if encoding == "delta8" else np.uint16)
        return _gaps_to_flat(_read_stream(payload, entry["stream"], dtype, where), nnz, size, where)
    raise FileFormatError(f"unknown index encoding {encoding!r} for leaf '{where}'")


# ----------------------------------------------------------------------------- value encodings


def _kmeans_1d(values: np.ndarray, k: int) -> np.ndarray:
    """Lloyd's k-means on a line with linearly spaced initial centroids (Han et al. 2016, Sec. 3.2:
    linear initialisation keeps the rare large weights, which matter most, representable)."""
    v = values.astype(np.float64)
    uniq = np.unique(v)
    if uniq.size <= k:
        return uniq
    centroids = np.linspace(v.min(), v.max(), k)
    for _ in range(50):
        codes = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, v)
        counts = np.bincount(codes, minlength=k)
        sums = np.bincount(codes, weights=v, minlength=k)
        new = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centroids))
        if np.array_equal(new, centroids):
            break
        centroids = new
    return centroids


def _nearest(codebook: np.ndarray, values: np.ndarray) -> np.ndarray:
    mids = (codebook[1:].astype(np.float64) + codebook[:-1]) / 2
    return np.searchsorted(mids, values.astype(np.float64)).astype(np.uint8)


def _encode_values(
    values: np.ndarray, mode: str, bits: int, where: str, payload: _Payload
) -> tuple[dict[str, Any], np.ndarray, str]:
    """Returns (manifest entry, the values as they will load, the encoding's name)."""
    if mode == "float16":
        if np.any(np.abs(values[np.isfinite(values)]) > np.finfo(np.float16).max):
            raise ValueError(
                f"save(values='float16'): leaf '{where}' has values beyond float16's range "
                f"(max {np.finfo(np.float16).max}); use values='exact' or 'shared' for it"
            )
        half = values.astype(np.float16)
        return {"mode": "float16", "data": payload.add(half)}, half.astype(values.dtype), mode
    if mode == "shared":
        if not np.all(np.isfinite(values)):
            raise ValueError(
                f"save(values='shared'): leaf '{where}' has NaN or infinite values; expected "
                "finite weights (use values='exact' for this tree)"
            )
        # Zeros get code 0 of their own and nonzeros never do, so the pruned weights of a dense
        # leaf stay exactly the pruned ones. The codebook is rounded to the leaf's dtype before
        # codes are assigned, so each code points to the nearest value actually stored.
        zero = values == 0
        has_zero = int(zero.any())
        shared = np.unique(_kmeans_1d(values[~zero], (1 << bits) - has_zero).astype(values.dtype))
        codebook = np.concatenate([np.zeros(has_zero, values.dtype), shared])
        codes = np.zeros(values.size, np.uint8)
        codes[~zero] = _nearest(shared, values[~zero]) + has_zero
        packed = np.packbits(
            np.unpackbits(codes[:, None], axis=1, count=bits, bitorder="little"),
            bitorder="little",
        )
        entry = {
            "mode": "shared",
            "bits": bits,
            "codebook_size": int(codebook.size),
            "codebook": payload.add(codebook),
            "codes": payload.add(packed),
        }
        return entry, codebook[codes] if codebook.size else values, f"shared{bits}"
    return {"mode": "exact", "data": payload.add(values)}, values, "exact"


def _decode_values(payload: bytes, entry: Mapping[str, Any], dtype, n: int, where: str):
    mode = entry.get("mode")
    if mode == "exact":
        values = _read_stream(payload, entry["data"], dtype, where)
    elif mode == "float16":
        values = _read_stream(payload, entry["data"], np.dtype(np.float16), where).astype(dtype)
    elif mode == "shared":
        bits, size = int(entry["bits"]), int(entry["codebook_size"])
        codebook = _read_stream(payload, entry["codebook"], dtype, where)
        packed = _read_stream(payload, entry["codes"], np.dtype(np.uint8), where)
        if not 1 <= bits <= 8 or codebook.size != size or packed.size != (n * bits + 7) // 8:
            raise FileFormatError(f"shared-weight values of leaf '{where}' are malformed")
        codes = np.packbits(
            np.unpackbits(packed, count=n * bits, bitorder="little").reshape(n, bits),
            axis=1,
            bitorder="little",
        ).ravel()
        if n and (size == 0 or codes.max() >= size):
            raise FileFormatError(f"shared-weight codes of leaf '{where}' exceed the codebook")
        values = codebook[codes] if n else np.zeros(0, dtype)
    else:
        raise FileFormatError(f"unknown value mode {mode!r} for leaf '{where}'")
    if values.size != n:
        raise FileFormatError(f"leaf '{where}' has {values.size} values, expected {n}")
    return values


def _max_abs_error(original: np.ndarray, restored: np.ndarray) -> float:
    if original is restored or original.size == 0:
        return 0.0
    a, b = original.astype(np.float64), restored.astype(np.float64)
    # A NaN or infinite weight stored as itself has no error (inf - inf would say NaN).
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        return float(np.max(np.where(same, 0.0, np.abs(a - b))))
