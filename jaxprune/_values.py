"""Value encodings of the model file: exact, float16, and shared weights (1-D k-means).

Deep Compression (Han et al. 2016) stores a layer's weights as codes into a small codebook; these
functions write and check such entries, and read them back a bounded piece at a time.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from jaxprune._codecs import (
    _POSITIONS,
    FileFormatError,
    Read,
    Stream,
    _aligned_empty,
    _check_int,
    _check_object,
    _parse_stream,
    _Payload,
    _read_stream,
)


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


class Values(NamedTuple):
    """A checked value entry: its mode, its streams (data, or codebook and codes), code bits."""

    mode: str
    streams: tuple[Stream, ...]
    bits: int


def _parse_values(entry: Any, dtype: np.dtype, n: int, floating: bool, what: str) -> Values:
    """Checks a leaf's value entry for ``n`` values of ``dtype`` before anything is read.

    Args:
      entry: the manifest's ``values`` object.
      dtype: the leaf's dtype.
      n: how many values the leaf holds.
      floating: whether ``dtype`` is a floating dtype (lossy modes are only for those).
      what: where the entry is, for errors.

    Returns:
      The checked :class:`Values`.

    Raises:
      FileFormatError: naming the field that breaks the format.

    Example:
      >>> entry = {"mode": "exact", "data": {"planes": 1, "raw_length": 2, "parts": [["raw", 0, 2]]}}
      >>> _parse_values(entry, np.dtype("bool"), 2, False, "m").mode
      'exact'
      >>> _parse_values({**entry, "mode": "float16"}, np.dtype("bool"), 2, False, "m")
      Traceback (most recent call last):
      jaxprune._codecs.FileFormatError: m: values mode 'float16' is for floating dtypes, not bool
    """
    mode = entry.get("mode") if isinstance(entry, dict) else None
    if mode in ("exact", "float16", "shared") and mode != "exact" and not floating:
        raise FileFormatError(f"{what}: values mode {mode!r} is for floating dtypes, not {dtype}")
    if mode in ("exact", "float16"):
        entry = _check_object(entry, ("mode", "data"), f"{what}: values")
        stream_dtype = dtype if mode == "exact" else np.dtype("<f2")
        data = _parse_stream(entry["data"], stream_dtype, (n, n), f"{what}: values")
        return Values(mode, (data,), 0)
    if mode == "shared":
        keys = ("mode", "bits", "codebook_size", "codebook", "codes")
        entry = _check_object(entry, keys, f"{what}: values")
        bits = _check_int(entry["bits"], f"{what}: bits", 1, 8)
        most = 1 << bits if n else 0  # a codebook of at most 2**bits values, empty for no values
        size = _check_int(entry["codebook_size"], f"{what}: codebook_size", min(n, 1), most)
        codebook = _parse_stream(entry["codebook"], dtype, (size, size), f"{what}: codebook")
        length = (n * bits + 7) // 8
        codes = _parse_stream(
            entry["codes"], np.dtype(np.uint8), (length, length), f"{what}: codes"
        )
        return Values(mode, (codebook, codes), bits)
    raise FileFormatError(f"{what}: values mode {mode!r}; expected 'exact', 'float16' or 'shared'")


def _decode_values(read: Read, values: Values, dtype: np.dtype, n: int, what: str) -> np.ndarray:
    """The ``n`` values of a checked entry; bool values must be stored as bytes 0 or 1."""
    if values.mode == "exact":
        out = _read_stream(read, values.streams[0], f"{what}: values")
        if dtype == np.bool_ and out.view(np.uint8).max(initial=0) > 1:
            raise FileFormatError(f"{what}: a bool value is stored as a byte other than 0 and 1")
        return out
    out = _aligned_empty((n,), dtype)
    if values.mode == "float16":
        np.copyto(out, _read_stream(read, values.streams[0], f"{what}: values"), casting="unsafe")
        return out
    codebook = _read_stream(read, values.streams[0], f"{what}: codebook")
    packed = _read_stream(read, values.streams[1], f"{what}: codes")
    bits, tail = values.bits, n * values.bits % 8
    if tail and packed[-1] >> tail:
        raise FileFormatError(f"{what}: the padding bits after the last code are not 0")
    for start in range(0, n, _POSITIONS):  # _POSITIONS is a multiple of 8: whole bytes
        count = min(_POSITIONS, n - start)
        piece = packed[start * bits // 8 : (start * bits + count * bits + 7) // 8]
        bit_rows = np.unpackbits(piece, count=count * bits, bitorder="little").reshape(count, bits)
        codes = np.packbits(bit_rows, axis=1, bitorder="little").ravel()
        if codes.max() >= codebook.size:
            raise FileFormatError(
                f"{what}: code {codes.max()} is past the codebook's {codebook.size} values"
            )
        out[start : start + count] = codebook[codes]
    return out


def _max_abs_error(original: np.ndarray, restored: np.ndarray) -> float:
    if original is restored or original.size == 0:
        return 0.0
    a, b = original.astype(np.float64), restored.astype(np.float64)
    # A NaN or infinite weight stored as itself has no error (inf - inf would say NaN).
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        return float(np.max(np.where(same, 0.0, np.abs(a - b))))
