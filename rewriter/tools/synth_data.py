"""The bytes of synthetic tensors: tiles of plausible values, or weights that compute (finite, unit-scale activations), generated in bounded chunks."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from functools import lru_cache

import numpy as np
import numpy.random

from core.format import nbytes_of

_TILE_BYTES = 1 << 16


def _seed(name: str, row: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{name}#{row}".encode(), digest_size=8).digest(), "little")


def _bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    bits = values.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _tile(name: str, dtype: str, row: int, nbytes: int) -> bytes:
    """A deterministic pattern of ``nbytes`` for one row, unique to (tensor, row)."""
    rng = np.random.default_rng(_seed(name, row))
    n = min(nbytes, _TILE_BYTES)
    if dtype == "BF16":
        if name.endswith(("norm.weight",)):
            vals = 1.0 + 0.05 * rng.standard_normal(n // 2)
        else:
            vals = 0.02 * rng.standard_normal(n // 2)
        tile = _bf16(vals).tobytes()
    elif name.endswith("_scales"):
        tile = rng.integers(118, 123, n, dtype=np.uint8).tobytes()
    else:
        tile = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    reps = -(-nbytes // len(tile))
    return (tile * reps)[:nbytes] if reps > 1 else tile


def tensor_chunks(name: str, dtype: str, shape: tuple[int, ...]) -> Iterator[bytes]:
    """The tensor's bytes, one row of dim 0 at a time (an expert, for expert tensors)."""
    total = nbytes_of(dtype, shape)
    if not shape or shape[0] == 0:
        if total:
            yield _tile(name, dtype, 0, total)
        return
    rows = shape[0]
    row_bytes = total // rows
    # Large 2-D tensors that are not expert-stacked (embeddings) are emitted in bigger blocks.
    step = max(1, (8 << 20) // max(row_bytes, 1)) if row_bytes < (1 << 20) else 1
    for r in range(0, rows, step):
        k = min(step, rows - r)
        if k == 1:
            yield _tile(name, dtype, r, row_bytes)
        else:
            yield b"".join(_tile(name, dtype, r + i, row_bytes) for i in range(k))


#: Yields a tensor's bytes in order, given (name, dtype, shape).
Values = Callable[[str, str, tuple[int, ...]], Iterator[bytes]]


def _fan_in(name: str, shape: tuple[int, ...]) -> int:
    """Inputs summed per output of a weight: MXFP4 blocks hold 32 values per group; fused bf16
    experts are ``[E, in, out]``; linear weights ``[out, in]``."""
    if name.endswith(("_blocks", "_scales")):
        return (shape[2] if name.endswith("_blocks") else shape[-1]) * 32
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return shape[1]
    return shape[-1]


def _e4m3_values() -> np.ndarray:
    """The value of each F8_E4M3 byte (NaN for 0x7F and 0xFF): sign, 4 exponent bits (bias 7), 3
    mantissa bits, subnormal below exponent 1."""
    b = np.arange(256)
    exp, man = (b >> 3) & 0xF, b & 7
    mag = np.where(exp == 0, man / 8 * 2.0 ** -6, (1 + man / 8) * 2.0 ** (exp - 7))
    mag = np.where((b & 0x7F) == 0x7F, np.nan, mag)
    return np.where(b & 0x80, -mag, mag)


def _e4m3(values: np.ndarray) -> np.ndarray:
    """float -> the nearest F8_E4M3 byte (ties to the lower magnitude), as uint8."""
    table = _e4m3_values()[:0x7F]  # the non-negative finite values, ascending
    mag = np.minimum(np.abs(values), table[-1])
    hi = np.clip(np.searchsorted(table, mag), 1, len(table) - 1)
    byte = np.where(table[hi] - mag < mag - table[hi - 1], hi, hi - 1).astype(np.uint8)
    return byte | np.where(values < 0, 0x80, 0).astype(np.uint8)


@lru_cache(maxsize=1)
def _e4m3_tile() -> np.ndarray:
    return _e4m3(np.random.default_rng(0).standard_normal(1 << 22, dtype=np.float32))


def _computing_tile(name: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A tensor's repeating pattern (uint8): constants for norms, biases, sinks and MXFP4
    scales; otherwise random values scaled by the fan-in, so activations stay near unit size.
    FP8 block-scaled weights hold unit-normal values and their ``weight_scale_inv`` blocks
    1/sqrt(fan-in), the weight's inputs (128 per scale column)."""
    rng = np.random.default_rng(_seed(name, -1))
    if name.endswith("weight_scale_inv"):
        return np.full(1, 1.0 / np.sqrt(shape[-1] * 128), dtype=np.float32).view(np.uint8)
    if dtype == "F8_E4M3":  # one shared pattern (encoding is slow), each tensor starting elsewhere in it
        return np.roll(_e4m3_tile(), -int(rng.integers(0, 1 << 22)))
    if name.endswith("_scales"):
        # Random E2M1 nibbles have an RMS of 2.93: pick the exponent that brings the weights'
        # RMS to 1/sqrt(fan-in).
        exponent = round(np.log2(1.0 / (np.sqrt(_fan_in(name, shape)) * 2.93)))
        return np.full(1, 127 + exponent, dtype=np.uint8)
    if name.endswith("_blocks"):
        return rng.integers(0, 256, 16 << 20, dtype=np.uint8)
    if name.endswith("norm.weight"):
        return _bf16(np.ones(1)).view(np.uint8)
    if name.endswith(("bias", "sinks")):
        return np.zeros(2, dtype=np.uint8)
    std = 1.0 if name.endswith("embed_tokens.weight") else 1.0 / np.sqrt(_fan_in(name, shape))
    values = rng.standard_normal(min(math.prod(shape), 1 << 22), dtype=np.float32) * std
    return (_bf16(values) if dtype == "BF16" else values.astype(np.float32)).view(np.uint8)


def computing_chunks(name: str, dtype: str, shape: tuple[int, ...]) -> Iterator[bytes]:
    """Bytes of weights that compute: finite, unit-scale activations through any number of layers
    (unlike :func:`tensor_chunks`, whose patterns are for tracing bytes). Rows of dim 0 (experts)
    start at different places of the tensor's random pattern, so experts differ and routing spreads."""
    if dtype not in ("BF16", "F32", "U8", "F8_E4M3"):
        raise ValueError(f"{name}: no computing values for dtype {dtype}")
    total = nbytes_of(dtype, shape)
    tile = _computing_tile(name, dtype, shape)
    rows = shape[0] if shape else 1
    row_bytes = total // max(rows, 1)
    step = max(1, (8 << 20) // max(row_bytes, 1))
    constant = tile.size <= 2 or name.endswith("weight_scale_inv")
    twice = tile if constant else np.concatenate([tile, tile])
    for r in range(0, rows, step):
        n = min(step, rows - r) * row_bytes
        offset = (r * 1_000_003 * 2) % tile.size
        if constant:
            yield tile.tobytes() * (n // tile.size)
        elif n <= tile.size:
            yield twice[offset : offset + n].tobytes()
        else:
            yield np.resize(np.roll(tile, -offset), n).tobytes()
