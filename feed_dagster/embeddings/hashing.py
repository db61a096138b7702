"""Vectorised, process-independent 64-bit hashing of strings and integers.

Python's built-in `hash()` is salted per process and polars' `Series.hash` is only stable
within one polars version, so neither can key vectors that are stored and reused across runs.
These functions depend only on the UTF-8 bytes and on fixed constants: the same string gives
the same hash on every machine, process and library version.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

_U64 = np.uint64
# Odd 64-bit multiplier for the polynomial string hash (the FNV-1 64-bit prime).
_POLY_BASE = _U64(0x100000001B3)
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)
_MAX_CHUNK_BYTES = 1 << 24


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over all 64 output bits.

    The polynomial hash alone has weak low bits for short strings; feature indices and signs
    are cut from these bits, so they must be well mixed.
    """
    z = x.astype(_U64, copy=True)
    with np.errstate(over="ignore"):
        z += _GOLDEN
        z ^= z >> _U64(30)
        z *= _MIX1
        z ^= z >> _U64(27)
        z *= _MIX2
        z ^= z >> _U64(31)
    return z


def combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Order-dependent combination of two hash arrays (used for word bigrams)."""
    with np.errstate(over="ignore"):
        return mix64(a * _MIX1 + (b ^ (b >> _U64(29))))


def _string_buffers(strings: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 [n+1], utf8 bytes uint8) of a string Series without copying per row."""
    arr = strings.to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = pc.cast(arr, pa.large_string())
    _, off_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(off_buf, dtype=np.int64, count=len(arr) + 1, offset=arr.offset * 8)
    data = (
        np.frombuffer(data_buf, dtype=np.uint8)
        if data_buf is not None
        else np.zeros(0, dtype=np.uint8)
    )
    return offsets, data


def hash_strings(strings: pl.Series, seed: int = 0) -> np.ndarray:
    """uint64 hash of every string in `strings` (nulls hash like the empty string).

    A polynomial hash over the UTF-8 bytes, sum(b_j * B^(L-1-j)) mod 2^64, evaluated for all
    strings at once with one segmented sum, then finalised with the length and `seed`.
    """
    n = len(strings)
    if n == 0:
        return np.zeros(0, dtype=_U64)
    offsets, data = _string_buffers(strings.fill_null(""))
    starts, ends = offsets[:-1], offsets[1:]
    lengths = ends - starts
    total = int(ends[-1] - starts[0])
    if total > _MAX_CHUNK_BYTES and n > 1:
        # Bound the per-byte temporaries (8 bytes per input byte) for long article bodies.
        rows = max(1, n * _MAX_CHUNK_BYTES // total)
        return np.concatenate(
            [hash_strings(strings.slice(i, rows), seed) for i in range(0, n, rows)]
        )
    out = np.zeros(n, dtype=_U64)
    if total > 0:
        max_len = int(lengths.max())
        powers = np.empty(max_len, dtype=_U64)
        powers[0] = 1
        with np.errstate(over="ignore"):
            powers[1:] = _POLY_BASE
            powers = np.cumprod(powers, dtype=_U64)
        seg = data[int(starts[0]) : int(ends[-1])].astype(_U64)
        # Exponent of each byte = its distance from the end of its own string.
        byte_end = np.repeat(ends - starts[0], lengths)
        exponent = byte_end - 1 - np.arange(total, dtype=np.int64)
        with np.errstate(over="ignore"):
            terms = (seg + _U64(1)) * powers[exponent]
        nonempty = lengths > 0
        # reduceat needs strictly valid start positions; empty strings keep hash 0 + length mix.
        out[nonempty] = np.add.reduceat(terms, (starts - starts[0])[nonempty])
    with np.errstate(over="ignore"):
        salted = out ^ (lengths.astype(_U64) * _MIX2) ^ mix64(np.array([seed], dtype=_U64))
    return mix64(salted)


def hash_ints(values: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint64 hash of integers, distinct from `hash_strings` output for the same seed."""
    with np.errstate(over="ignore"):
        salted = values.astype(np.int64).view(_U64) * _MIX1 ^ mix64(
            np.array([seed + 0x5EED], dtype=_U64)
        )
    return mix64(salted)
