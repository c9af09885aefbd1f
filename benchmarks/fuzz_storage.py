"""A long structure-aware fuzz of jaxprune.load, printing the loads counted by outcome.

Each case takes a file saved from one of a few trees (BCOO and dense leaves, bool, int, empty,
nested, every index and value encoding) and either edits its manifest (a shape, dtype, key,
offset, codec, length... replaced, nudged, dropped or added; a JSON field repeated) with the CRC
recomputed, or mutates bytes of the manifest text (CRC and lengths fixed up), or flips bytes
anywhere (CRC left alone). Outcomes:

- identical: the saved tree, bit for bit;
- reinterpreted: the saved bytes and positions, bit for bit, under metadata the edit changed and
  the format allows (a dtype of the same width, a reshape, a list for a tuple, other BCOO flags);
- FileFormatError: refused;
- crash: any other exception; silent wrong load: other data. Both must stay at zero.

Usage: python benchmarks/fuzz_storage.py [--loads N] [--seed S]
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import random
import time
import traceback
import zlib
from typing import Any

import jax
import numpy as np
from jax.experimental.sparse import BCOO

from jaxprune import storage
from jaxprune.storage import FileFormatError

OUTCOMES = ("identical", "reinterpreted", "FileFormatError", "crash", "silent wrong load")

_POOL = [
    *(0, 1, -1, 2, 3, 4, 7, 8, 20, 255, 256, 65535, 2**31, 2**48 + 1, 2**63, 2**64, 2**70, -64),
    *(1.0, 0.5, float("inf"), True, False, None, "", "fc", "fc/kernel", "<root>", "x" * 300),
    *("float32", "int32", "uint32", "int8", "uint8", "bool", "bfloat16", "float16", "int16"),
    *("float64", "int64", "complex64", "float128", "object", "V4", "finfo", "int4", "S1"),
    *("raw", "zlib", "lzma", "bitmask", "delta8", "delta16", "exact", "shared"),
    *("dense", "bcoo", "dict", "list", "tuple", "leaf", "none"),
    *([], [0], [1], [-64, -64], [2**40, 2**40], [1, 2, 3], [[]], [None], ["raw", 0, 0]),
    *({}, {"t": "none"}, {"t": "leaf", "i": 0}, {"t": "leaf", "i": 1}),
]
_SAME_WIDTH = [
    ("float32", "int32", "uint32", "complex32"),
    ("int8", "uint8", "bool", "float8_e4m3fn"),
    ("float16", "bfloat16", "int16", "uint16"),
]


def base_trees() -> list[tuple[Any, dict]]:
    """Small trees and the save options for them; together they use every encoding."""
    rng = np.random.default_rng(0)

    def bcoo(shape, density, dtype=np.float32):
        flat = np.flatnonzero(rng.random(int(np.prod(shape))) < density)
        indices = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int32)
        data = rng.normal(size=flat.size).astype(dtype)
        return BCOO((data, indices), shape=shape, indices_sorted=True, unique_indices=True)

    tree = {
        "fc": {"kernel": bcoo((30, 20), 0.2), "bias": np.arange(20, dtype=np.float32)},
        "flags": np.array([True, False, True]),
        "steps": np.array([3, -7], np.int32),
        "empty": np.zeros((0, 4), np.float32),
        "nested": [(None, np.arange(-3, 3, dtype=np.int8)), {"conv": bcoo((3, 3, 4), 0.3)}],
    }
    sparse = {"wide": bcoo((2, 3000), 0.002), "Dense_0": {"kernel": rng.normal(size=(6, 5))}}
    return [
        (tree, {}),
        (tree, {"compress": False, "index": "bitmask"}),
        (tree, {"index": "delta", "values": "float16"}),
        (tree, {"values": "shared", "bits": 3}),
        (sparse, {"values": "shared", "bits": 1, "compress": False}),
        (sparse, {"index": "delta"}),
    ]


def base_files() -> list[tuple[bytes, Any]]:
    """(file bytes, the tree they load as) for every base tree."""
    files = []
    for tree, options in base_trees():
        opts = {"values": "exact", "bits": 8, "index": "auto", "compress": True, **options}
        blob = storage._encode(tree, opts)[0]
        files.append((blob, load_bytes(blob)))
    return files


def load_bytes(blob: bytes) -> Any:
    return storage._decode(io.BytesIO(blob), len(blob), "fuzz")


def split(blob: bytes) -> tuple[int, bytes, bytes]:
    """(version, manifest bytes, payload bytes) of a well-formed file."""
    _, version, manifest_len, _ = storage._HEADER.unpack_from(blob)
    start = storage._HEADER.size
    return version, blob[start : start + manifest_len], blob[start + manifest_len : -4]


def join(version: int, manifest: bytes, payload: bytes) -> bytes:
    """A file around ``manifest`` and ``payload`` with its lengths and CRC recomputed."""
    header = storage._HEADER.pack(storage._MAGIC, version, len(manifest), len(payload))
    body = header + manifest + payload
    return body + storage._CRC.pack(zlib.crc32(body))


def _places(node: Any, path: tuple = ()) -> list[tuple]:
    places = [path]
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in items:
        places.extend(_places(child, (*path, key)))
    return places


def _nudged(value: Any, rng: random.Random) -> Any:
    if type(value) is int:
        return rng.choice([value + 1, value - 1, -value, 2 * value + 1, value + 2**32])
    if isinstance(value, str):
        group = next((g for g in _SAME_WIDTH if value in g), None)
        return rng.choice(group) if group else value + rng.choice(["", "x", "/0"])
    if isinstance(value, list):
        if value and all(type(v) is int for v in value):
            return rng.choice([[-v for v in value], value[::-1], [*value, 1], value[:-1]])
        return [*value, value[-1]] if value else [0]
    return rng.choice(_POOL)


def edit_manifest(manifest: Any, rng: random.Random) -> None:
    """One structural edit in place: replace, nudge, drop, add or move a value."""
    path = rng.choice(_places(manifest)[1:])
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    op = rng.choice(["replace", "nudge", "nudge", "drop", "add", "swap"])
    if op == "replace":
        parent[key] = json.loads(json.dumps(rng.choice(_POOL)))
    elif op == "nudge":
        parent[key] = _nudged(parent[key], rng)
    elif op == "drop":
        del parent[key]
    elif op == "add" and isinstance(parent, dict):
        parent[rng.choice(["extra", "t", "i", "k", "v"])] = rng.choice(_POOL)
    elif op == "add":
        parent.insert(key, json.loads(json.dumps(parent[key])))
    elif isinstance(parent, list) and len(parent) > 1:
        other = rng.randrange(len(parent))
        parent[key], parent[other] = parent[other], parent[key]


def mutate(blob: bytes, rng: random.Random) -> bytes:
    """A mutated copy of a file: manifest edits, manifest text edits, or raw byte flips."""
    version, manifest, payload = split(blob)
    roll = rng.random()
    if roll < 0.75:
        parsed = json.loads(manifest)
        for _ in range(rng.choice([1, 1, 2, 3])):
            edit_manifest(parsed, rng)
        text = json.dumps(parsed, separators=(",", ":"))
        if rng.random() < 0.05:  # a repeated JSON field, which json.dumps cannot write
            text = text.replace('"t":"leaf"', '"t":"none","t":"leaf"', 1)
        return join(version, text.encode(), payload)
    if roll < 0.9:
        data = bytearray(manifest)
        for _ in range(rng.choice([1, 2, 3])):
            i = rng.randrange(len(data))
            data[i : i + 1] = rng.choice([b"", b"0", b"9", b"-", b"[", b"}", b'"', b"1e9"])
        return join(version, bytes(data), payload)
    data = bytearray(blob)
    for _ in range(rng.choice([1, 2, 3])):
        data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    return bytes(data)


def _leaves(tree: Any) -> list:
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, BCOO))


def _content(tree: Any) -> list[tuple[str, bytes, bytes]]:
    """Per leaf: its kind, value bytes and (for a BCOO) flat positions; nothing else."""
    out = []
    for leaf in _leaves(tree):
        if isinstance(leaf, BCOO):
            indices = np.asarray(leaf.indices).astype(np.int64)
            flat = np.ravel_multi_index(tuple(indices.T), leaf.shape) if indices.size else indices
            out.append(("bcoo", np.asarray(leaf.data).tobytes(), np.asarray(flat).tobytes()))
        else:
            out.append(("dense", np.asarray(leaf).tobytes(), b""))
    return out


def _same(got: Any, want: Any) -> bool:
    is_bcoo = lambda x: isinstance(x, BCOO)  # noqa: E731
    if jax.tree.structure(got, is_leaf=is_bcoo) != jax.tree.structure(want, is_leaf=is_bcoo):
        return False
    for a, b in zip(_leaves(got), _leaves(want), strict=True):
        if type(a) is not type(b) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        arrays = (a.data, a.indices, b.data, b.indices) if isinstance(a, BCOO) else (a, b)
        if isinstance(a, BCOO) and (a.indices.dtype != b.indices.dtype):
            return False
        half = len(arrays) // 2
        if [np.asarray(x).tobytes() for x in arrays[:half]] != [
            np.asarray(x).tobytes() for x in arrays[half:]
        ]:
            return False
    return True


def classify(blob: bytes, reference: Any) -> tuple[str, str]:
    """(outcome, detail) of loading ``blob``, against the tree the unmutated file loads as."""
    try:
        got = load_bytes(blob)
    except FileFormatError as e:
        return "FileFormatError", str(e)
    except Exception:  # a crash is what this counts
        return "crash", traceback.format_exc(limit=4)
    if _same(got, reference):
        return "identical", ""
    if _content(got) == _content(reference):
        return "reinterpreted", ""
    return "silent wrong load", repr(got)[:300]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    files = base_files()
    counts: collections.Counter = collections.Counter()
    samples: dict[str, str] = {}
    start = time.perf_counter()
    for _ in range(args.loads):
        blob, reference = rng.choice(files)
        outcome, detail = classify(mutate(blob, rng), reference)
        counts[outcome] += 1
        samples.setdefault(outcome, detail)
    seconds = time.perf_counter() - start
    print(f"{args.loads} loads of mutated files in {seconds:.1f} s (seed {args.seed})")
    for outcome in OUTCOMES:
        print(f"{outcome:<18} {counts[outcome]:>7}")
    for outcome in ("crash", "silent wrong load"):
        if counts[outcome]:
            print(f"\nfirst {outcome}:\n{samples[outcome]}")


if __name__ == "__main__":
    main()
